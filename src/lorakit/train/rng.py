"""Capture and restore every random-number state training touches, without pickle.

- torch CPU generator: a uint8 tensor (stored in safetensors).
- torch CUDA generators, one per device (``torch_cuda_<i>``), when CUDA is in use (available and
  initialised): dropout on a GPU draws from them. A CPU-only run stores none, and a checkpoint
  without them (a CPU run's, an older lorakit's) leaves them as they are; states of devices this
  machine does not have are not restored.
- numpy's global MT19937: 624 uint32 keys (tensor) + position / gaussian cache (JSON).
- Python ``random``: its state tuple of ints (JSON).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything"]

_CUDA_PREFIX = "torch_cuda_"


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, json_fields)`` describing the torch, numpy and Python RNG states now."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state().clone(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
        **_cuda_states(),
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


def _cuda_states() -> dict[str, torch.Tensor]:
    """``{"torch_cuda_<i>": state}`` of every CUDA device, when CUDA is in use; else nothing
    (asking would initialise CUDA in a run that does not use it)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    states = torch.cuda.get_rng_state_all()
    return {f"{_CUDA_PREFIX}{i}": state.cpu().clone() for i, state in enumerate(states)}


def restore_rng_state(tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> None:
    """Put back the states captured by ``capture_rng_state``."""
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    _restore_cuda_states(tensors)
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


def _restore_cuda_states(tensors: dict[str, torch.Tensor]) -> None:
    """Set the CUDA generators saved in ``tensors`` (none: nothing to do) of the devices this
    machine has."""
    saved = {
        int(k[len(_CUDA_PREFIX) :]): v for k, v in tensors.items() if k.startswith(_CUDA_PREFIX)
    }
    if not saved or not torch.cuda.is_available():
        return
    for device, state in saved.items():
        if device < torch.cuda.device_count():
            torch.cuda.set_rng_state(state.to(torch.uint8), device)
