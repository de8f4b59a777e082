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
so not checked on load, for modules whose init ran in another process: the base in memory is
then ``W_res``, whose fingerprint would hold the converted file to the wrong base, and
``W_res + s B0 A0`` gives ``W0`` back only up to float32 rounding, not the bits a fingerprint
compares). The header metadata of a plain save that is not about the init (the recorded prompt
style) is kept.

Only an adapter whose init rewrote the base is converted. One whose config names an init that
keeps the base (``False``, ``"gaussian"``, ``"eva"``, ``"orthogonal"``: ``B0 A0 = 0`` or the
base untouched, ``_keeps_base``) is refused first, whatever its ``B0``. Otherwise it is
converted when the model's config, the initial adapter's config (PEFT's file) or its
``lorakit.base_changing_init`` metadata (lorakit's) says PiSSA / OLoRA, or, with no such
record, when its initial ``B0`` is not zero (PEFT's own recipe saves the initial adapter, and
then the trained one, with ``init_lora_weights=True``, so ``True`` records nothing). Any other
(``True`` with ``B0 = 0``) is refused: its conversion would be a rank-2r adapter with half of
B zero.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.config_checks import DRAWN_INITS
from lorakit.errors import UserError
from lorakit.init_methods import changes_base, changes_base_in_peft_only
from lorakit.io import fingerprint, fingerprint_json
from lorakit.io.config_json import config_to_json
from lorakit.io.read import BASE_INIT_METADATA_KEY, CONFIG_METADATA_KEY, AdapterFile, read_adapter
from lorakit.io.save import PROMPT_STYLE_METADATA_KEY
from lorakit.state import adapter_configs, lora_layers, state_of

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


def _recorded_inits(config: LoraConfig, initial: AdapterFile) -> list[str]:
    """The base-changing inits recorded for the adapter: in its config (an init run in this
    process, or a PEFT file loaded), the initial adapter's config (PEFT's file) and its
    ``BASE_INIT_METADATA_KEY`` metadata (lorakit's file, whose config says true)."""
    found = (
        config.init_lora_weights,
        initial.config.init_lora_weights,
        initial.metadata.get(BASE_INIT_METADATA_KEY),
    )
    return [str(init) for init in found if changes_base(init) or changes_base_in_peft_only(init)]


def _loftq_refusal() -> UserError:
    """The error for converting a LoftQ adapter (whose base is ``Q``, not ``W0 - s B0 A0``)."""
    return UserError(
        "a LoftQ adapter cannot be converted on save: its initial factors only approximate "
        "W0 - Q, so no plain LoRA for the original base reproduces it. Save it without "
        "initial_adapter and use it with the quantized base."
    )


def _keeps_base(init: object) -> bool:
    """True when ``init`` (an ``init_lora_weights``) is one that leaves the base as it was:
    ``False`` (random B, base untouched), ``"gaussian"`` / ``"eva"`` (``B0 = 0``) and
    ``"orthogonal"`` (``B0 != 0`` but ``B0 A0 = 0``: ``init_factors.orthogonal_factors``).
    Not ``True``: PEFT's recipe writes it in the files of PiSSA / OLoRA adapters too."""
    return init is False or init in ("gaussian", "eva", *DRAWN_INITS)


def _nothing_to_convert(config: LoraConfig, initial: AdapterFile, source: str) -> UserError:
    """The error for converting an adapter whose init left the base as it was."""
    return UserError(
        f"nothing to convert: the adapter was initialised with "
        f"init_lora_weights={config.init_lora_weights!r} (the initial adapter {source} says "
        f"{initial.config.init_lora_weights!r}), which leaves the base weights as they were, so "
        "the adapter already is a plain LoRA of the original base. Conversion on save is for "
        "PiSSA / OLoRA adapters; save it without initial_adapter."
    )


def _check_base_was_rewritten(config: LoraConfig, initial: AdapterFile, source: str) -> None:
    """``UserError`` unless the initial adapter belongs to an init that rewrote the base with
    ``W0 - s B0 A0`` (module docstring): an adapter whose config names an init that keeps the
    base (``_keeps_base``: checked first, since ``"orthogonal"`` has ``B0 != 0`` too), LoftQ
    (its ``Q`` is no such residual), and an adapter no record calls base-changing whose ``B0``
    is all zero or whose initial adapter's config names such an init."""
    if _keeps_base(config.init_lora_weights):
        raise _nothing_to_convert(config, initial, source)
    recorded = _recorded_inits(config, initial)
    if "loftq" in recorded:
        raise _loftq_refusal()
    if recorded:
        return
    moved = any(
        tensor.any() for key, tensor in initial.tensors.items() if key.endswith(".lora_B.weight")
    )
    if moved and not _keeps_base(initial.config.init_lora_weights):
        return  # PEFT's recipe: the initial adapter saved with init_lora_weights=True
    raise _nothing_to_convert(config, initial, source)


def _original_fingerprints(model: nn.Module, adapter_name: str) -> dict[str, dict[str, object]]:
    """Per LoRA module of the adapter, the fingerprint of its base before the base-changing
    init, recorded when the init ran in this process; none for the other modules (their base
    in memory is ``W_res``, not the base the converted adapter fits: see the module
    docstring)."""
    result = {}
    for name, layer in lora_layers(model):
        before = layer.base_fingerprints_before_init.get(adapter_name)
        if adapter_name in layer.ranks and before is not None:
            result[name] = before
    return result


def _carried_metadata(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """The header entries of a plain save that the converted file keeps: the recorded prompt
    style (``lorakit.io.save.record_prompt_style``), which ``lorakit generate`` reads. (The
    fingerprint, config and ``BASE_INIT_METADATA_KEY`` describe the unconverted adapter.)"""
    style = state_of(model).prompt_styles.get(adapter_name)
    return {} if style is None else {PROMPT_STYLE_METADATA_KEY: style}


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
    if config.init_lora_weights == "loftq":  # (before reading the initial adapter)
        raise _loftq_refusal()
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise UserError(
            "converting on save (initial_adapter=...) is not supported with use_rslora=True "
            "together with rank_pattern or alpha_pattern (as in peft); save without conversion."
        )
    initial = read_adapter(initial_adapter)
    initial.require_finite()
    _check_base_was_rewritten(config, initial, str(initial_adapter))
    joined = _joined_factors(tensors, initial.tensors, str(initial_adapter))
    _check_initial_base(model, adapter_name, initial.fingerprint, str(initial_adapter))
    plain = doubled_config(config)
    modules = [layer.base_layer for _, layer in lora_layers(model) if adapter_name in layer.ranks]
    config_text = config_to_json(model, plain, modules)
    fingerprints = _original_fingerprints(model, adapter_name)
    metadata = {
        "format": "pt",
        fingerprint.METADATA_KEY: fingerprint_json.to_metadata(fingerprints),
        CONFIG_METADATA_KEY: config_text,
        **_carried_metadata(model, adapter_name),
    }
    return joined, metadata, config_text
