"""The tiny Llama (seed 0) offloaded by accelerate, two ways, for the offload tests."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from tests import tiny_models


def cpu_offloaded(tmp_path: Path | None = None) -> torch.nn.Module:
    """``cpu_offload``: every module holding weights hooked, its weights on meta between calls."""
    model = tiny_models.llama(seed=0)
    cpu_offload(model, execution_device=torch.device("cpu"))
    return model


def device_mapped(tmp_path: Path, device_map: dict[str, str]) -> torch.nn.Module:
    """``from_pretrained(device_map=...)`` of the model saved once under ``tmp_path / "base"``,
    each call with its own offload folder ("disk" entries)."""
    base = tmp_path / "base"
    if not base.exists():
        tiny_models.llama(seed=0).save_pretrained(base)
    folder = tmp_path / f"offload{len(list(tmp_path.glob('offload*')))}"
    model = AutoModelForCausalLM.from_pretrained(
        base, device_map=device_map, offload_folder=folder, dtype=torch.float32
    )
    return model.eval()
