"""Models offloaded by accelerate, and the checks the offload tests share: the tiny Llama
(seed 0) offloaded as loaded (``cpu_offloaded``, ``device_mapped``), any model offloaded in
place one of three ways (``OFFLOADERS``, ``offload``), a random adapter on the tiny Llama
(``adapted``), and logits / files compared with the plain model's."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import cpu_offload, disk_offload, dispatch_model
from transformers import AutoModelForCausalLM

import lorakit
from tests import tiny_models

TOL = 1e-6
CPU = torch.device("cpu")
FILES = ("adapter_model.safetensors", "adapter_config.json")
DEVICE_MAP = {  # the head, the embedding and layer 1 offloaded to "disk"; the rest on the CPU
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
OFFLOADERS = {  # (model, its offload folder): the model offloaded in place
    "cpu_offload": lambda model, folder: cpu_offload(model, execution_device=CPU),
    "disk_offload": lambda model, folder: disk_offload(model, folder, execution_device=CPU),
    "dispatch_model": lambda model, folder: dispatch_model(
        model, device_map=DEVICE_MAP, main_device="cpu", offload_dir=folder
    ),
}


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


def offload(model: torch.nn.Module, how: str, folder: Path) -> torch.nn.Module:
    """``model`` offloaded in place the way ``how`` names (``OFFLOADERS``; "dispatch_model"
    takes the tiny Llama's ``DEVICE_MAP``), each call with its own folder under ``folder``."""
    OFFLOADERS[how](model, folder / f"offload{len(list(folder.glob('offload*')))}")
    return model


def adapted(targets: list[str], **overrides) -> torch.nn.Module:
    """The tiny Llama (seed 0) with a random adapter (r 4, alpha 8) on ``targets``, unless
    ``overrides`` (``LoraConfig`` fields) say otherwise; a head copy or token rows moved 0.5
    (as trained ones)."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets} | overrides
    model = lorakit.inject(tiny_models.llama(seed=0), lorakit.LoraConfig(**config))
    tiny_models.randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.5)
    return model


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s logits on ``tiny_models.input_ids()``, without gradients."""
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= TOL


def assert_same_files(got: Path, want: Path) -> None:
    """The adapter files in the two folders are the same, byte for byte."""
    for name in FILES:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
