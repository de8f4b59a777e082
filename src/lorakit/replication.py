"""PEFT's ``layer_replication``: stack copies of decoder layers that share the base weights.

A map ``[[start, end), ...]`` builds the new layer list from the ranges of the original one, in
order: ``[[0, 4], [2, 5]]`` on layers 0..4 gives ``[0, 1, 2, 3, 2, 3, 4]`` (7 layers). Each
copy is a new module whose parameters ARE the original's (no memory for the base), so each
copy's modules can get their own LoRA adapter (the targets are found on the replicated model:
``model.layers.5.self_attn.q_proj`` is an adapter of its own). The layer list is found as PEFT
finds it: ``model(.model)*`` then ``.bert``, then ``.layers``, ``.encoder.layer`` or ``.h``;
``layer_idx`` attributes are renumbered and ``config.num_hidden_layers`` updated, as in PEFT.
``lorakit.unload`` puts the original layer list back; ``merge_and_unload`` keeps the replicated
layers (each merged copy has its own weights then).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

__all__ = ["replicate_layers", "replicated_map", "restore_layers"]

_RECORD = "lorakit_replicated_layers"


@dataclass
class _Replicated:
    """What ``restore_layers`` needs: where the list lives, the original list and layer count,
    and the map applied."""

    holder: nn.Module
    attribute: str
    original: nn.ModuleList
    num_hidden_layers: int | None
    layer_map: list[list[int]]


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module holding the layer list, attribute name)``, PEFT's search; ValueError if none."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    if isinstance(getattr(inner, "bert", None), nn.Module):
        inner = inner.bert
    for holder, attribute in ((inner, "layers"), (getattr(inner, "encoder", None), "layer")):
        if holder is not None and isinstance(getattr(holder, attribute, None), nn.ModuleList):
            return holder, attribute
    if isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner, "h"
    raise ValueError(
        f"layer_replication needs a list of decoder layers, and this {type(model).__name__} has "
        "none where PEFT looks for one (model.layers, encoder.layer or h); remove "
        "layer_replication from the config."
    )


def _shared_copy(layer: nn.Module, index: int) -> nn.Module:
    """A deep copy of ``layer`` whose parameters and buffers are ``layer``'s own objects (a
    quantized base such as lorakit's GGUF, int8-rows or int4-groups layers holds its weight in
    buffers: shared too, not doubled); ``layer_idx`` attributes set to ``index``."""
    clone = copy.deepcopy(layer)
    for name, module in layer.named_modules():
        target = clone.get_submodule(name)
        for parameter_name, parameter in module.named_parameters(recurse=False):
            target.register_parameter(parameter_name, parameter)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            persistent = buffer_name not in module._non_persistent_buffers_set
            target.register_buffer(buffer_name, buffer, persistent=persistent)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return clone


def replicated_map(model: nn.Module) -> list[list[int]] | None:
    """The map ``model``'s layers were replicated with (None if they were not)."""
    record = model.__dict__.get(_RECORD)
    return None if record is None else record.layer_map


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> bool:
    """Replace ``model``'s layer list by the copies ``layer_map`` names (see the module
    docstring); True if the model changed, False if it already has exactly these layers.
    ValueError for a range outside the layer list, for another map than the one applied, or
    for a model holding adapters already (replicating their layers would copy those too)."""
    applied = replicated_map(model)
    if applied is not None:
        if applied != layer_map:
            raise ValueError(
                f"the model's layers were replicated with layer_replication={applied}; an "
                f"adapter with {layer_map} cannot share them. Use the same map, or unload first."
            )
        return False
    if "lorakit_state" in model.__dict__:
        raise ValueError(
            f"layer_replication={layer_map} on a model that holds adapters already: replicate "
            "with the first adapter (or unload the others first)."
        )
    holder, attribute = _layer_list(model)
    original = getattr(holder, attribute)
    for start, end in layer_map:
        if end > len(original):
            raise ValueError(
                f"layer_replication range [{start}, {end}) is outside the {len(original)} "
                f"layers of this {type(model).__name__}."
            )
    indices = [i for start, end in layer_map for i in range(start, end)]
    copies = nn.ModuleList(_shared_copy(original[i], n) for n, i in enumerate(indices))
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    setattr(holder, attribute, copies)
    if count is not None:
        config.num_hidden_layers = len(copies)
    record = _Replicated(holder, attribute, original, count, [list(p) for p in layer_map])
    model.__dict__[_RECORD] = record
    return True


def restore_layers(model: nn.Module) -> None:
    """Put the original layer list (and ``num_hidden_layers``) back; nothing if not replicated."""
    record = model.__dict__.pop(_RECORD, None)
    if record is None:
        return
    setattr(record.holder, record.attribute, record.original)
    if record.num_hidden_layers is not None:
        model.config.num_hidden_layers = record.num_hidden_layers
