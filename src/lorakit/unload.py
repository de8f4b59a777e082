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

__all__ = ["forget_state", "freeze_adapter", "put_saved_copy", "unload"]


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
        if isinstance(wrapper, TrainableTokens):  # (its trained rows are dropped)
            replace_module(model, name, original_module(wrapper))
        elif put_saved_copy(model, name, wrapper, keep_saved, tied) and hasattr(
            getattr(model, "config", None), "tie_word_embeddings"
        ):  # (the copy is put in place first, whatever the config)
            model.config.tie_word_embeddings = False  # the trained copy is not the embedding
    forget_state(model)
    restore_layers(model)
    return model


def put_saved_copy(
    model: nn.Module, name: str, wrapper: ModulesToSave, names: Sequence[str], tied: set[int]
) -> bool:
    """Replace the ``modules_to_save`` wrapper at ``name`` by the trained copy of the first of
    ``names`` that has one (else its original module); whether a trained copy replaced a module
    holding one of the ``tied`` parameters (ids): the model's weights are then no longer tied."""
    original, copies = original_module(wrapper), wrapper.modules_to_save
    kept = next((copies[adapter] for adapter in names if adapter in copies), original)
    replace_module(model, name, kept)
    return kept is not original and any(id(p) in tied for p in original.parameters())


def forget_state(model: nn.Module) -> None:
    """Drop lorakit's record from ``model`` and give parameters back their original trainability."""
    state = state_of(model)
    if state is None:
        return
    for name, parameter in model.named_parameters():
        if name in state.original_requires_grad:
            parameter.requires_grad_(state.original_requires_grad[name])
    del model.lorakit_state
