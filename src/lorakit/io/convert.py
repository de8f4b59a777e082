"""Convert a PiSSA/OLoRA adapter into a plain LoRA for the ORIGINAL base on save (PEFT's
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

A base-changing init (``lorakit.init_methods``) left ``W_res = W0 - s B0 A0``; after training the
layer computes ``W_res + s B A = W0 + s (B A - B0 A0)``. So the update to the original ``W0`` is
a LoRA of rank 2r::

    A' = [A; A0]   (2r, k)        B' = [B, -B0]   (d, 2r)        s' = s

``s' = s`` holds with ``r' = 2r`` and ``lora_alpha' = 2 lora_alpha`` (rsLoRA: ``sqrt(2)
lora_alpha``, since ``s = alpha / sqrt(r)``); ``rank_pattern`` and ``alpha_pattern`` values
change the same way. ``A0, B0`` come from the initial adapter, saved right after ``inject`` and
before any training. The converted file has ``init_lora_weights: true`` and the fingerprint of
the base weights as they were before the init overwrote them (kept by ``init_methods``; absent,
so not checked on load, for modules whose adapter was created in another process).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.init_methods import changes_base
from lorakit.io import fingerprint
from lorakit.io.config_json import config_to_json
from lorakit.io.read import CONFIG_METADATA_KEY, read_adapter
from lorakit.state import adapter_configs, lora_layers

__all__ = ["converted_contents", "doubled_config"]


def doubled_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r adapter: ranks doubled, alphas doubled (times sqrt(2) under
    rsLoRA) so every scaling stays the same, ``init_lora_weights=True``."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r,
        lora_alpha=factor * config.lora_alpha,
        rank_pattern={key: 2 * rank for key, rank in config.rank_pattern.items()},
        alpha_pattern={key: factor * alpha for key, alpha in config.alpha_pattern.items()},
        init_lora_weights=True,
    )


def _joined_factors(
    tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """``A' = [A; A0]`` and ``B' = [B, -B0]`` for every LoRA factor of ``tensors``."""
    joined = dict(tensors)
    for key, value in tensors.items():
        is_A, is_B = key.endswith(".lora_A.weight"), key.endswith(".lora_B.weight")
        if not (is_A or is_B):
            continue
        start = initial.get(key)
        if start is None or start.shape != value.shape:
            found = "missing" if start is None else f"of shape {tuple(start.shape)}"
            raise UserError(
                f"the initial adapter {source} does not fit: {key} is {found}, the adapter's is "
                f"{tuple(value.shape)}. Pass the adapter saved right after inject, before training."
            )
        if torch.finfo(start.dtype).eps > torch.finfo(value.dtype).eps:
            raise UserError(
                f"the initial adapter {source} holds {key} in {start.dtype}, the adapter in "
                f"{value.dtype}: the base was left by the exact initial factors, and rounded ones "
                "would not cancel them (the converted LoRA would be off by their rounding). Save "
                "the initial adapter at full precision (save_adapter without dtype=)."
            )
        start = start.to(value.dtype)
        joined[key] = torch.cat([value, start], 0) if is_A else torch.cat([value, -start], 1)
    return joined


def _check_initial_base(
    model: nn.Module,
    adapter_name: str,
    stored: dict[str, dict[str, object]] | None,
    source: str,
) -> None:
    """``UserError`` when the initial adapter's recorded base fingerprint (the residual base
    ``W_res`` it was saved on) does not match the model's current base in some module of the
    adapter: it then comes from another init (another run, seed or model), and its ``A0, B0``
    are not the ones this base was left by. Not checked without a fingerprint (peft's files)."""
    names = [name for name, layer in lora_layers(model) if adapter_name in layer.ranks]
    found = fingerprint.first_mismatch(model, stored or {}, names)
    if found is not None:
        module, reason = found
        raise UserError(
            f"the initial adapter {source} does not belong to this model: module {module!r} "
            f"has a base other than the one recorded with it ({reason}), so it was saved after "
            "another init (another run or seed) and the conversion would write a wrong LoRA. "
            "Pass the adapter saved right after inject of this model, before training."
        )


def _original_fingerprints(
    model: nn.Module, adapter_name: str, config: LoraConfig
) -> dict[str, dict[str, object]]:
    """Per LoRA module of the adapter, the fingerprint of the base before a base-changing init
    (or of the current base, when the init did not change it)."""
    result = {}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.ranks:
            continue
        before = layer.base_fingerprints_before_init.get(adapter_name)
        if before is not None:
            result[name] = before
        elif not changes_base(config.init_lora_weights):
            result.update(fingerprint.compute(model, [name]))
    return result


def converted_contents(
    model: nn.Module,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    initial_adapter: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """``(tensors, header metadata, config text)`` of the plain LoRA for the original base,
    from the adapter's saved ``tensors`` and the initial adapter in directory
    ``initial_adapter`` (see the module docstring)."""
    config = adapter_configs(model)[adapter_name]
    if config.init_lora_weights == "loftq":
        raise UserError(
            "a LoftQ adapter cannot be converted on save: its initial factors only approximate "
            "W0 - Q, so no plain LoRA for the original base reproduces it. Save it without "
            "initial_adapter and use it with the quantized base."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise UserError(
            "converting on save (initial_adapter=...) is not supported with use_rslora=True "
            "together with rank_pattern or alpha_pattern (as in peft); save without conversion."
        )
    initial = read_adapter(initial_adapter)
    initial.require_finite()
    joined = _joined_factors(tensors, initial.tensors, str(initial_adapter))
    _check_initial_base(model, adapter_name, initial.fingerprint, str(initial_adapter))
    plain = doubled_config(config)
    modules = [layer.base_layer for _, layer in lora_layers(model) if adapter_name in layer.ranks]
    config_text = config_to_json(model, plain, modules)
    fingerprints = _original_fingerprints(model, adapter_name, config)
    metadata = {
        "format": "pt",
        fingerprint.METADATA_KEY: fingerprint.to_metadata(fingerprints),
        CONFIG_METADATA_KEY: config_text,
    }
    return joined, metadata, config_text
