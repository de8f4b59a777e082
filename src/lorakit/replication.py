"""PEFT's ``layer_replication``: stack copies of decoder layers that share the base weights.

A map ``[[start, end), ...]`` builds the new layer list from the ranges of the original one, in
order: ``[[0, 4], [2, 5]]`` on layers 0..4 gives ``[0, 1, 2, 3, 2, 3, 4]`` (7 layers). Each
copy is a new module whose parameters ARE the original's (no memory for the base), so each
copy's modules can get their own LoRA adapter (the targets are found on the replicated model:
``model.layers.5.self_attn.q_proj`` is an adapter of its own). The layer list is found as PEFT
finds it: ``model(.model)*`` then ``.bert``, then ``.layers``, ``.encoder.layer`` or ``.h``;
``layer_idx`` attributes are renumbered and ``config.num_hidden_layers`` updated, as in PEFT;
``config.layer_types`` (transformers' per-layer attention kinds: Qwen2, Gemma2, ...) is
replicated with the layers, which PEFT does not do (its forward then reads past the list).
``lorakit.unload`` puts the original layer list back; ``merge_and_unload`` keeps the replicated
layers (each merged copy has its own weights then: ``own_replicated_tensors``). A tensor that
only copies of one layer share is not a tie (``tied_parameter_ids``): merging into one copy
unties nothing that transformers ties (the input and output embeddings keep one tensor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.state import parameter_holders

__all__ = [
    "own_replicated_tensors",
    "replicate_layers",
    "replicated_map",
    "restore_layers",
    "tied_parameter_ids",
]

_RECORD = "lorakit_replicated_layers"


@dataclass
class _Replicated:
    """What ``restore_layers`` needs: where the list lives, the original list, layer count and
    ``layer_types``, and the map applied."""

    holder: nn.Module
    attribute: str
    original: nn.ModuleList
    num_hidden_layers: int | None
    layer_map: list[list[int]]
    layer_types: list | None = None


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


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of the parameters ``model`` holds under several names, where the layer copies
    of ``layer_replication`` count as the one original layer they copy: ``lm_head.weight`` /
    ``model.embed_tokens.weight`` are tied, ``model.layers.0.mlp.up_proj.weight`` /
    ``model.layers.2.mlp.up_proj.weight`` (both copies of layer 0 under
    ``layer_replication=[[0, 2], [0, 1]]``) are not, LoRA-wrapped or not. ``merge_and_unload``
    and ``unload`` clear ``tie_word_embeddings`` only where a merge or a trained copy replaced
    one of these: a merge into a layer copy gives that copy its own weight and leaves the
    other copies, which hold the original tensor, as they were."""
    holders = parameter_holders(model)
    inside = _in_layer_list(model)
    if inside is None:  # (not replicated)
        return {key for key, names in holders.items() if len(names) > 1}
    record = model.__dict__[_RECORD]
    original: dict[int, int] = {}  # id -> how many names the original layer list holds it under
    for _, parameter in record.original.named_parameters(remove_duplicate=False):
        original[id(parameter)] = original.get(id(parameter), 0) + 1
    tied = set()
    for key, names in holders.items():
        copies = [name for name in names if inside(name)]
        count = len(names) - len(copies) + (original.get(key, len(copies)) if copies else 0)
        if count > 1:
            tied.add(key)
    return tied


def _in_layer_list(model: nn.Module):
    """A test of whether a parameter name of ``model`` lies in its replicated layer list
    (``model.layers.<n>.``); None where the layers were not replicated."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        return None
    holders = (name for name, module in model.named_modules() if module is record.holder)
    holder = next(holders, None)
    if holder is None:  # (the list's holder is no longer in the model)
        return None
    prefix = f"{holder}.{record.attribute}." if holder else f"{record.attribute}."
    return lambda name: name.startswith(prefix)


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
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(layer_types, list) or len(layer_types) != len(original):
        layer_types = None  # no per-layer list to replicate (or one that is not per layer)
    setattr(holder, attribute, copies)
    if count is not None:
        config.num_hidden_layers = len(copies)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in indices]
    layer_map = [list(pair) for pair in layer_map]
    record = _Replicated(holder, attribute, original, count, layer_map, layer_types)
    model.__dict__[_RECORD] = record
    return True


def restore_layers(model: nn.Module) -> None:
    """Put the original layer list (and ``num_hidden_layers``, ``layer_types``) back; nothing
    if not replicated."""
    record = model.__dict__.pop(_RECORD, None)
    if record is None:
        return
    setattr(record.holder, record.attribute, record.original)
    if record.num_hidden_layers is not None:
        model.config.num_hidden_layers = record.num_hidden_layers
    if record.layer_types is not None:
        model.config.layer_types = record.layer_types


def own_replicated_tensors(model: nn.Module) -> None:
    """Give each replicated layer copy its own parameters and buffers, and forget the record
    (``merge_and_unload``: the result is a plain model of the longer depth, which transformers
    can save; it refuses tensors shared between layers). A tensor that an earlier copy holds is
    cloned (same values, dtype, device and ``requires_grad``; one clone per copy, so tensors
    shared inside one layer stay shared), so the layers hold as much memory as a plain model of
    that depth. Nothing if ``model`` was not replicated."""
    record = model.__dict__.pop(_RECORD, None)
    if record is None:
        return
    earlier: set[int] = set()
    for layer in getattr(record.holder, record.attribute):
        held = {id(tensor) for tensor in (*layer.parameters(), *layer.buffers())}
        clones: dict[int, torch.Tensor] = {}
        for module in layer.modules():
            _own_tensors(module, earlier, clones)
        earlier |= held


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` that shares no memory with it (a Parameter stays a Parameter)."""
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.detach().clone(), tensor.requires_grad)
    return tensor.clone()


def _own_tensors(module: nn.Module, earlier: set[int], clones: dict[int, torch.Tensor]) -> None:
    """Replace each of ``module``'s own parameters and buffers whose id is in ``earlier`` (held
    by an earlier layer copy) by its clone in ``clones`` (made on first use)."""
    for name, parameter in list(module.named_parameters(recurse=False)):
        if id(parameter) in earlier:
            module.register_parameter(name, _clone_once(parameter, clones))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if id(buffer) in earlier:
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, _clone_once(buffer, clones), persistent=persistent)


def _clone_once(tensor: torch.Tensor, clones: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor``'s clone in ``clones``, made on first use."""
    if id(tensor) not in clones:
        clones[id(tensor)] = _clone(tensor)
    return clones[id(tensor)]
