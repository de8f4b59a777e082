"""Taking adapters off a model, or freezing one: ``unload`` (every adapter gone, the original
modules, weights, trainability and layer list back), ``forget_state`` (lorakit's record dropped,
trainability restored; ``merge_and_unload`` uses it after folding the weights in) and
``freeze_adapter`` (one adapter's tensors get no gradient). ``inject`` adds adapters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave, TrainableTokens
from lorakit.replication import restore_layers
from lorakit.state import (
    adapter_model,
    lora_layers,
    parameter_holders,
    saved_modules,
    state_of,
    walk_modules,
)
from lorakit.targets import original_module
from lorakit.wrapped_modules import replace_module

__all__ = ["forget_state", "freeze_adapter", "unload"]


def freeze_adapter(
    model: nn.Module, adapter_name: str, module_names: Iterable[str] | None = None
) -> None:
    """Freeze one adapter's tensors (its LoRA factors and saved-module copies get no gradient);
    every other flag stays as it is.

    ``module_names``: the modules holding the adapter, when the caller knows them (adding the
    100th adapter then costs what adding the first did); default: every LoRA layer and saved
    module of the model."""
    if module_names is None:
        holders = [m for _, m in walk_modules(model) if isinstance(m, (LoraLayer, ModulesToSave))]
    else:
        holders = [model.get_submodule(name) for name in module_names]
    for module in holders:
        if isinstance(module, LoraLayer) and adapter_name in module.ranks:
            parameters = module.adapter_parameters(adapter_name)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            parameters = list(module.modules_to_save[adapter_name].parameters())
        else:
            continue
        for parameter in parameters:
            parameter.requires_grad_(False)


def unload(model: nn.Module, keep_saved: Sequence[str] = ()) -> nn.Module:
    """Remove every adapter: restore the original module objects, weights and trainability
    (the ``requires_grad`` flags the model had before its first adapter), and the original
    layer list of a model whose layers ``layer_replication`` copied.

    ``keep_saved``: adapter names whose ``modules_to_save`` copies stay: each saved module
    becomes the trained copy of the first of them that has one (its original where none has;
    PEFT's ``unload()`` keeps the active adapter's). Trainable-token rows are always dropped."""
    model = adapter_model(model)  # lorakit's PeftModel: the model inside it
    for name, layer in reversed(list(lora_layers(model))):  # a nested layer before its outer one
        layer.unmerge()
        replace_module(model, name, layer.base_layer)
    tied = {key for key, names in parameter_holders(model).items() if len(names) > 1}
    for name, wrapper in list(saved_modules(model)):
        original, kept = original_module(wrapper), _unloaded_saved_module(wrapper, keep_saved)
        replace_module(model, name, kept)
        untied = kept is not original and any(id(p) in tied for p in original.parameters())
        if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
            model.config.tie_word_embeddings = False  # the trained copy is not the embedding
    forget_state(model)
    restore_layers(model)
    return model


def _unloaded_saved_module(wrapper: ModulesToSave, keep_saved: Sequence[str]) -> nn.Module:
    """The module that replaces a saved-module wrapper on unload: the trained copy of the first
    of ``keep_saved`` that has one, else the original module."""
    if isinstance(wrapper, TrainableTokens):
        return original_module(wrapper)
    copies = wrapper.modules_to_save
    kept = (copies[name] for name in keep_saved if name in copies)
    return next(kept, original_module(wrapper))


def forget_state(model: nn.Module) -> None:
    """Drop lorakit's record from ``model`` and give parameters back their original trainability."""
    state = state_of(model)
    if state is None:
        return
    for name, parameter in model.named_parameters():
        if name in state.original_requires_grad:
            parameter.requires_grad_(state.original_requires_grad[name])
    del model.lorakit_state
