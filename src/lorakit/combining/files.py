"""A ``CombinedAdapter`` written as PEFT's files, or put onto a model.

The files are those ``lorakit.save_adapter`` writes: ``adapter_model.safetensors`` (PEFT's keys,
``lorakit.io.keys.lora_keys``; header metadata ``{"format": "pt"}``, the base fingerprint the
inputs carried and a copy of the config; the base weights the inputs carried, under PEFT's
keys, ``lorakit.io.keys.base_weight_key``) and ``adapter_config.json`` (PEFT's fields, keys
sorted, ``target_modules`` the exact module names), both staged and renamed by
``lorakit.io.atomic.write_files``. No base model is needed to write them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.combining.combined import CombinedAdapter
from lorakit.errors import BaseModelMismatchError, UserError

__all__ = ["adapter_config_text", "add_to_model", "write_adapter_files"]

# Constant entries PEFT writes (as lorakit.io.config_json does).
_PEFT_CONSTANTS = {
    "auto_mapping": None,
    "inference_mode": True,
    "peft_type": "LORA",
    "revision": None,
    "use_dora": False,
}


def adapter_config_text(adapter: CombinedAdapter) -> str:
    """``adapter_config.json`` for the combined adapter: every ``LoraConfig`` field under its
    PEFT name plus PEFT's constant entries, ``json.dumps(indent=2)`` with sorted keys."""
    values = adapter.config.to_dict() | _PEFT_CONSTANTS | {"auto_mapping": adapter.auto_mapping}
    if values["exclude_modules"] is None:
        del values["exclude_modules"]  # a key older peft versions do not know
    values["rank_pattern"] = dict(sorted(values["rank_pattern"].items()))
    return json.dumps(dict(sorted(values.items())), indent=2)


def write_adapter_files(adapter: CombinedAdapter, directory: Path) -> Path:
    """Write the two files into ``directory`` (created if needed) atomically; returns it."""
    from lorakit.io import atomic, fingerprint, fingerprint_json
    from lorakit.io.config_json import CONFIG_NAME
    from lorakit.io.header import serialize
    from lorakit.io.keys import base_weight_key, lora_keys
    from lorakit.io.read import CONFIG_METADATA_KEY, WEIGHTS_NAME

    if directory.exists() and not directory.is_dir():
        raise UserError(f"output {directory} is a file; give a directory (new or existing)")
    tensors = {}
    for name, (lora_A, lora_B) in adapter.factors.items():
        key_A, key_B = lora_keys(name, name in adapter.embeddings)
        tensors[key_A], tensors[key_B] = lora_A.contiguous(), lora_B.contiguous()
    for name, weight in adapter.base_weights.items():  # PEFT's key for an adapted one or not
        tensors[base_weight_key(name, name in adapter.factors)] = weight.contiguous()
    config_text = adapter_config_text(adapter)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: config_text}
    if adapter.fingerprint:
        metadata[fingerprint.METADATA_KEY] = fingerprint_json.to_metadata(adapter.fingerprint)
    directory.mkdir(parents=True, exist_ok=True)
    atomic.write_files(
        {
            directory / WEIGHTS_NAME: serialize(
                tensors, metadata
            ),  # weights first, as save_adapter
            directory / CONFIG_NAME: config_text.encode("utf-8"),
        }
    )
    return directory


def add_to_model(adapter: CombinedAdapter, model: nn.Module, adapter_name: str) -> nn.Module:
    """Inject ``adapter`` into ``model`` as ``adapter_name`` (inactive), after checking the
    model's base weights against the inputs' fingerprint (``BaseModelMismatchError``).
    ``model``: a model or lorakit's ``PeftModel`` (into the model inside it); returned."""
    from lorakit.inject import inject
    from lorakit.io import fingerprint
    from lorakit.state import adapter_model, lora_layers

    given, model = model, adapter_model(model)  # lorakit's PeftModel: the model inside it
    modules = dict(model.named_modules())
    missing = [name for name in adapter.factors if name not in modules]
    if missing:
        raise UserError(f"the model has no module {missing[0]!r}; is it the adapters' base?")
    found = fingerprint.first_mismatch(model, adapter.fingerprint, list(adapter.factors))
    if found is not None:
        raise BaseModelMismatchError(
            f"module {found[0]!r} of the model differs from the base the combined adapters were "
            f"trained on ({found[1]}); add the result to that base model."
        )
    _check_carried_base_weights(adapter, modules)
    inject(model, adapter.config, adapter_name, activate=False)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapter.factors.items():
            parameter_A, parameter_B = layers[name].adapter_parameters(adapter_name)
            parameter_A.copy_(lora_A.to(parameter_A.dtype))
            parameter_B.copy_(lora_B.to(parameter_B.dtype))
    return given


def _check_carried_base_weights(adapter: CombinedAdapter, modules: dict[str, nn.Module]) -> None:
    """``BaseModelMismatchError`` when a base weight the inputs' files carry differs from the
    model's own beyond another dtype's rounding (``add_to`` leaves the base as it is; a load of
    the saved files writes it)."""
    from lorakit.combining.compatible import same_up_to_rounding
    from lorakit.io.file_tensors import unmerged_base_tensor

    for name, carried in adapter.base_weights.items():
        module = modules.get(name)
        own = None if module is None else unmerged_base_tensor(module, "weight")
        if own is None or not same_up_to_rounding(own.detach(), carried.to(own.device)):
            raise BaseModelMismatchError(
                f"the combined adapters' files carry a base weight for {name!r} (shape "
                f"{list(carried.shape)}, saved by save_embedding_layers) that differs from the "
                "model's; add_to does not change base weights. Save the result and load it "
                "with lorakit.load_adapter, which writes that weight, or resize the model's "
                "vocabulary to the adapters' first."
            )
