"""PEFT's ``load_adapter`` into an adapter the model already holds (``reload_adapter``): the
file's tensors copied into it, as PEFT does, where they fit it; a file that would change more
than the adapter's tensors, or does not fit them, is refused saying why."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["reload_adapter"]


def reload_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str,
    allow_base_mismatch: bool = False,
    subfolder: str | None = None,
) -> None:
    """PEFT's ``load_adapter`` into an adapter ``model`` holds: the file's tensors replace
    adapter ``adapter_name``'s, copied in place (an optimizer holding them keeps them); its
    config, ``requires_grad`` flags and active state stay. The file is read and checked as any
    load checks it (values, base fingerprint: it is loaded beside the adapter under a
    temporary name, copied over with ``set_peft_model_state_dict``, then removed).

    ``AdapterFileError`` saying why, the model left as it was, where the file does not fit the
    adapter: other tensors (targets, DoRA, ``modules_to_save``, bias on B), other shapes
    (ranks) or another scaling (``lora_alpha``, ``use_rslora``, patterns), where loading it would
    change more than the adapter's tensors (it trains the base's biases, rewrites the base
    (PiSSA / OLoRA / LoftQ), replicates layers or brings an embedding's base weight), for a ``.gguf``
    file, and while the adapter is merged. Load such a file under another name instead."""
    from lorakit.errors import AdapterFileError
    from lorakit.io.adapter_dirs import adapter_directory
    from lorakit.io.read import read_adapter_header

    source = os.fspath(directory)
    if source.endswith(".gguf"):
        raise AdapterFileError(_reload_refusal(source, adapter_name, "it is a .gguf file"))
    _check_reload_not_merged(model, adapter_name)
    resolved = adapter_directory(directory, adapter_name, subfolder=subfolder)
    why = _reload_misfit(model, read_adapter_header(resolved), adapter_name)
    if why:
        raise AdapterFileError(_reload_refusal(resolved, adapter_name, why))
    _load_and_copy(model, resolved, adapter_name, allow_base_mismatch)


def _reload_refusal(source: Any, adapter_name: str, why: str) -> str:
    return (
        f"cannot load adapter {source} into the existing adapter {adapter_name!r}: {why}. Load "
        f"it under another adapter_name, or delete_adapter({adapter_name!r}) first."
    )


def _check_reload_not_merged(model: nn.Module, adapter_name: str) -> None:
    from lorakit.state import lora_layers

    if any(adapter_name in layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError(
            f"adapter {adapter_name!r} is merged: loading new values into it would leave the "
            "merged weights as they are. Call unmerge_adapter() first."
        )


def _reload_misfit(model: nn.Module, header: Any, adapter_name: str) -> str:
    """Why the file of ``header`` cannot be copied into adapter ``adapter_name`` (read from the
    header and the model, nothing changed), or "" when its tensors are the adapter's."""
    import warnings

    from lorakit.io.load_checks import init_to_redo
    from lorakit.io.load_plan import load_targets
    from lorakit.io.older_peft_files import with_writers_rules
    from lorakit.io.save import adapter_file_entries
    from lorakit.state import walk_modules
    from lorakit.targets import original_module

    config = header.config
    if config.bias != "none":
        return f"it trains the base model's biases (bias={config.bias!r})"
    if init_to_redo(config) is not None:
        return f"it rewrites the base weights (init_lora_weights={config.init_lora_weights!r})"
    if config.layer_replication:
        return "it replicates layers (layer_replication)"
    modules = {name: original_module(module) for name, module in walk_modules(model)}
    header = with_writers_rules(header, modules)  # a file of peft < 0.22: its name rules
    with warnings.catch_warnings():  # (the load that follows warns, if it has to)
        warnings.simplefilter("ignore")
        planned = load_targets(model, header, modules).tensors
    if any(entry.role == "base_weight" for entry in planned):
        return "it brings an embedding's base weight (a resized vocabulary)"
    file_keys = {entry.key for entry in planned}
    own_keys = {entry.key for entry in adapter_file_entries(model, adapter_name, [])[0]}
    if file_keys == own_keys:
        return ""
    extra, lacking = sorted(file_keys - own_keys), sorted(own_keys - file_keys)
    parts = [f"{len(extra)} tensor(s) the adapter lacks, e.g. {extra[0]}"] if extra else []
    parts += [f"none of its {len(lacking)} tensor(s) such as {lacking[0]}"] if lacking else []
    return "it holds other tensors than the adapter (other targets, DoRA or saved modules?): " + (
        "; ".join(parts)
    )


def _load_and_copy(
    model: nn.Module, directory: Any, adapter_name: str, allow_base_mismatch: bool
) -> None:
    """Load ``directory`` beside adapter ``adapter_name`` under a temporary name, check its
    shapes and scalings against the adapter's, copy its tensors in and remove it."""
    from lorakit.errors import AdapterFileError
    from lorakit.io import load_adapter
    from lorakit.peft_state_dict import get_peft_model_state_dict, set_peft_model_state_dict
    from lorakit.state import adapter_configs, delete_adapter, state_of

    loaded = _temporary_name(adapter_configs(model), adapter_name)
    load_adapter(model, directory, loaded, allow_base_mismatch=allow_base_mismatch)
    try:
        theirs = get_peft_model_state_dict(model, adapter_name=loaded, save_embedding_layers=False)
        why = _shape_or_scaling_misfit(model, theirs, loaded, adapter_name)
        if why:
            raise AdapterFileError(_reload_refusal(directory, adapter_name, why))
        set_peft_model_state_dict(model, theirs, adapter_name)
        style = state_of(model).prompt_styles.get(loaded)
        if style is not None:  # (lorakit train's record, as a fresh load keeps it)
            state_of(model).prompt_styles[adapter_name] = style
    finally:
        delete_adapter(model, loaded)


def _temporary_name(taken: Any, adapter_name: str) -> str:
    name, number = f"{adapter_name}-reloading", 0
    while name in taken:
        number += 1
        name = f"{adapter_name}-reloading{number}"
    return name


def _shape_or_scaling_misfit(
    model: nn.Module, theirs: dict[str, torch.Tensor], loaded: str, adapter_name: str
) -> str:
    """Why the loaded adapter ``loaded`` does not fit ``adapter_name`` (a tensor's shape: its
    rank; a layer's scaling ``lora_alpha / r`` or ``/ sqrt(r)``), or ""."""
    import math

    from lorakit.peft_state_dict import get_peft_model_state_dict
    from lorakit.state import lora_layers

    ours = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    for key, tensor in theirs.items():
        if tensor.shape != ours[key].shape:
            return (
                f"{key} has shape {tuple(tensor.shape)}, the adapter's {tuple(ours[key].shape)} "
                "(another rank?)"
            )
    for name, layer in lora_layers(model):
        if loaded in layer.scalings and adapter_name in layer.scalings:
            a, b = layer.scalings[loaded], layer.scalings[adapter_name]
            if not math.isclose(a, b, rel_tol=1e-6):
                return (
                    f"module {name} scales it by {a:g}, the adapter by {b:g} (another lora_alpha "
                    "or use_rslora?)"
                )
    return ""
