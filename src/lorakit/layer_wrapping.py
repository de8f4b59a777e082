"""Wrapping a model's target modules in LoRA layers that hold no adapter yet (``wrap_targets``:
what ``inject`` does first, and all that serving needs), the training mode a new layer and its
adapter containers take, and the dtype adapter tensors get on a base
(``default_adapter_dtype``: the one rule for ``inject``, ``load_adapter`` and the serving bank).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lorakit.layers import LoraLayer, layer_class_for, wrap
from lorakit.quantized.loading import keep_4bit_storage
from lorakit.state import freeze_all, state_of
from lorakit.wrapped_modules import replace_module

__all__ = ["current_modules", "default_adapter_dtype", "give_layer_mode", "wrap_targets"]


def wrap_targets(
    model: nn.Module, names: Iterable[str], *, modules: Mapping[str, nn.Module] | None = None
) -> dict[str, LoraLayer]:
    """Wrap each module of ``names`` (in place) in a LoRA layer that holds no adapter yet; a
    module that is a LoRA layer already is kept. Returns ``{name: LoRA layer}``.

    Every module is checked (``layer_class_for``: ``UnsupportedModuleError``, a ``ValueError``,
    naming one lorakit cannot adapt) before any change. The first wrapping freezes the model and records its adapter
    state, so ``unload`` restores the original modules and trainability. A new layer takes the
    training mode of the module it wraps. ``modules``: name -> current module, when the caller
    has them. What ``inject`` does before adding an adapter, and all that serving needs (the
    bank holds the adapters, ``lorakit.serve.prepare_for_serving``).

    On a model holding bitsandbytes ``Linear4bit`` layers, the first wrapping turns off, on every
    one of them (adapted or not), bitsandbytes' eval-mode CPU repacking
    (``quantized.loading.keep_4bit_storage``): its stored bytes stay as loaded, so
    ``merge_and_unload`` can still read them.
    """
    current = current_modules(model, names, modules)
    for name, module in current.items():
        layer_class_for(module, name)  # (refuses a module no LoRA layer wraps)
    if state_of(model) is None:  # the first wrapping (every check passed: nothing can fail)
        keep_4bit_storage(model)  # once: a walk of every module at each load would add up
        state_of(model, create=True)  # records the flags that unload restores
        freeze_all(model)
    layers: dict[str, LoraLayer] = {}
    for name, module in current.items():
        if not isinstance(module, LoraLayer):
            module = wrap(module, name)
            module.training = module.base_layer.training  # a new wrapper takes the module's mode
            give_layer_mode(module)
            replace_module(model, name, module)
        layers[name] = module
    return layers


def current_modules(
    model: nn.Module, names: Iterable[str], modules: Mapping[str, nn.Module] | None
) -> dict[str, nn.Module]:
    """``{name: the module there now}``, from ``modules`` when the caller has them."""
    return {
        name: modules[name] if modules is not None else model.get_submodule(name) for name in names
    }


def give_layer_mode(layer: LoraLayer, adapter_name: str | None = None) -> None:
    """The layer's training mode (dropout on or off) to its adapter containers and to the
    modules of adapter ``adapter_name`` (if given); the work does not grow with the number of
    adapters on the layer."""
    for container in layer.children():
        if container is layer.base_layer:
            continue
        container.training = layer.training
        if isinstance(container, nn.ModuleDict) and adapter_name in container:
            container[adapter_name].train(layer.training)


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter tensors get on a base of ``base_dtype``: float32 on a float16 or
    bfloat16 base (small updates survive the optimizer's steps), else the base dtype. The one
    rule for the model's adapters (``inject``, ``load_adapter``) and the serving bank."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
