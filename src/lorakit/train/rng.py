"""Capture and restore every random-number state training touches, without pickle.

- torch CPU generator: a uint8 tensor (stored in safetensors).
- numpy's global MT19937: 624 uint32 keys (tensor) + position / gaussian cache (JSON).
- Python ``random``: its state tuple of ints (JSON).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, json_fields)`` describing the torch, numpy and Python RNG states now."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state().clone(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
    }
    version, python_state, gauss_next = random.getstate()
    fields = {
        "numpy": {
            "kind": kind,
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    return tensors, fields


def restore_rng_state(tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> None:
    """Put back the states captured by ``capture_rng_state``."""
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    numpy_fields = fields["numpy"]
    np.random.set_state(
        (
            numpy_fields["kind"],
            tensors["numpy_keys"].numpy().astype(np.uint32),
            numpy_fields["position"],
            numpy_fields["has_gauss"],
            numpy_fields["cached_gaussian"],
        )
    )
    python_fields = fields["python"]
    random.setstate(
        (python_fields["version"], tuple(python_fields["state"]), python_fields["gauss_next"])
    )
