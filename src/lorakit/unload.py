"""Taking adapters off a model, or freezing one: ``unload`` (every adapter gone, the original
modules, weights, trainability and layer list back), ``forget_state`` (lorakit's record dropped,
trainability restored; ``merge_and_unload`` uses it after folding the weights in) and
``freeze_adapter`` (one adapter's tensors get no gradient). ``inject`` adds adapters.

``own_tensors_for_reload`` makes a model whose tied weights a merge or a trained copy untied save
as it is: ``from_pretrained`` of its ``save_pretrained`` directory gives the same tensors
(``merge_and_unload``, ``unload`` and ``save_merged_model`` call it)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from itertools import cycle

from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave, TrainableTokens
from lorakit.replication import restore_layers, tied_parameter_ids
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

__all__ = [
    "declared_ties",
    "forget_state",
    "freeze_adapter",
    "keep_untied",
    "own_tensors_for_reload",
    "put_saved_copy",
    "unload",
    "without_base_layers",
]


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
    PEFT's ``merge_and_unload()`` keeps the active adapter's, and so did its ``unload()`` before
    0.22; 0.22's gives the original back). Trainable-token rows are always dropped."""
    model = adapter_model(model)  # lorakit's PeftModel: the model inside it
    for name, layer in reversed(list(lora_layers(model))):  # a nested layer before its outer one
        layer.unmerge()
        replace_module(model, name, layer.base_layer)
    tied = tied_parameter_ids(model)  # (not the tensors layer_replication's copies share)
    untied = False
    for name, wrapper in list(saved_modules(model)):
        if isinstance(wrapper, TrainableTokens):  # (its trained rows are dropped)
            replace_module(model, name, original_module(wrapper))
        else:  # (the copy is put in place first, whatever the config)
            untied |= put_saved_copy(model, name, wrapper, keep_saved, tied)
    if untied:  # the trained copy is not the embedding
        keep_untied(model)
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


def keep_untied(model: nn.Module) -> None:
    """Record that a merge or a trained copy untied ``model``'s tied weights: its config's
    ``tie_word_embeddings`` set False (where it has one; left True, a ``tie_weights()`` call
    would put the untied embedding back), and each former tie partner given the tensor it is
    saved and reloaded with (``own_tensors_for_reload``). ``merge_and_unload`` and ``unload``
    call it."""
    config = getattr(model, "config", None)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    own_tensors_for_reload(model)


def own_tensors_for_reload(model: nn.Module) -> list[str]:
    """Give a copy of its tensor to each parameter that ``save_pretrained`` would leave out and
    ``from_pretrained`` would not tie back to that same tensor, so that the saved directory
    reloads with the values ``model`` has; returns their names (none on a consistent model).

    ``save_pretrained`` writes a tensor held under several names once, leaving out the names
    that its models' ``_tied_weights_keys`` list as tie targets (``lm_head.weight``, T5's and
    BART's ``encoder``/``decoder.embed_tokens.weight``); ``from_pretrained`` fills a left-out
    target from the source the mapping names (``shared.weight``), and only where the config it
    reads back ties (``_tie_targets``). A target sharing a tensor with anything but its source,
    or with its source under a config that does not tie, reloads wrong: T5's
    ``encoder``/``decoder.embed_tokens`` and head kept ``W0`` while LoRA was merged into
    ``shared`` (reloaded: the merged ``shared``); BART's head still holds ``model.shared`` after
    LoRA merged into ``encoder``/``decoder.embed_tokens`` cleared ``tie_word_embeddings``
    (reloaded: random). Each such target gets a clone (same values, dtype, device and
    ``requires_grad``; where every holder of a tensor is one, the first keeps the original), is
    saved under its own name, and reloads as it is: transformers 5 ties a target found in the
    file only to a source with equal values. Each clone costs one more copy of the tensor (an
    embedding matrix, for these models)."""
    targets = _tie_targets(model)
    paths: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        paths[id(module)] = paths.get(id(module), 0) + 1
    cloned: list[str] = []
    for names in parameter_holders(model).values():
        apart = [name for name in names if name in targets and targets[name] not in names]
        for name in apart[1:] if len(apart) == len(names) else apart:  # (one keeps the tensor)
            _give_own_tensor(model, name, paths)
            cloned.append(name)
    return cloned


def _tie_targets(model: nn.Module) -> dict[str, str | None]:
    """``{target parameter name: source name}`` for every tie target that transformers'
    ``_tied_weights_keys`` declare in ``model`` (regex and module patterns expanded as
    transformers 5 expands them); the source is None where ``from_pretrained`` would not tie
    the target back: the module's config, read back from its dict as ``from_pretrained`` reads
    ``config.json``, does not tie (T5's config class ties whatever the file says)."""
    targets: dict[str, str | None] = {}
    for prefix, module in model.named_modules():
        mapping = getattr(module, "_tied_weights_keys", None)
        if not mapping:
            continue
        ties = _ties_on_reload(getattr(module, "config", None))
        for target, source in _expanded_ties(module, mapping).items():
            source = f"{prefix}.{source}" if prefix and source else source
            targets[f"{prefix}.{target}" if prefix else target] = source if ties else None
    return targets


def declared_ties(model: nn.Module) -> dict[str, str | None]:
    """``{target parameter name: source name}`` for every tie that transformers'
    ``_tied_weights_keys`` declare in ``model`` (expanded as in ``_tie_targets``), whatever its
    config says; the names are those of the model without lorakit's LoRA layers (each
    ``.base_layer`` segment dropped: ``shared.weight`` for ``shared.base_layer.weight``), so
    the result reads the same on an adapted model. ``inject`` uses it to find a targeted
    embedding that the forward never calls (T5's and BART's ``shared``)."""
    ties: dict[str, str | None] = {}
    for prefix, module in model.named_modules():
        mapping = getattr(module, "_tied_weights_keys", None)
        if not mapping:
            continue
        held = module.named_parameters(remove_duplicate=False)
        names = {without_base_layers(name) for name, _ in held}
        for target, source in _expanded_ties(module, mapping, names).items():
            source = without_base_layers(source) if source else source  # (a transformers 4 list)
            source = f"{prefix}.{source}" if prefix and source else source
            ties[f"{prefix}.{target}" if prefix else target] = source
    return ties


# The segment a LoRA layer adds to the names of its base module's parameters.
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def without_base_layers(name: str) -> str:
    """A parameter name of an adapted model as the unadapted model names it: each
    ``.base_layer`` segment a LoRA layer adds dropped (``shared.base_layer.weight`` ->
    ``shared.weight``)."""
    return _BASE_LAYER.sub("", name)


def _expanded_ties(
    module: nn.Module, mapping: object, names: Iterable[str] | None = None
) -> dict[str, str | None]:
    """``module``'s tie mapping as ``{target parameter: source parameter}``, its own names
    (``names``: its parameter names, where the caller gives them in another form). A dict
    (transformers 5: ``{target pattern: source pattern}``) is expanded as
    ``get_expanded_tied_weights_keys`` expands it; a list (transformers 4: the targets) is tied
    to the input embedding's weight (None where the module has none)."""
    if names is None:
        names = (name for name, _ in module.named_parameters(remove_duplicate=False))
    names = sorted(set(names))
    if not isinstance(mapping, dict):
        source = _input_weight_name(module)
        return {name: source for pattern in mapping for name in names if re.search(pattern, name)}
    expanded: dict[str, str | None] = {}
    for target_pattern, source_pattern in mapping.items():
        found = [name for name in names if re.search("^" + target_pattern, name)]
        sources = [name for name in names if re.search("^" + source_pattern, name)]
        if sources and len(found) % len(sources) == 0:  # (transformers refuses the others)
            for target, source in zip(found, cycle(sources)):
                expanded[target] = expanded.get(source, source)
    return expanded


def _input_weight_name(module: nn.Module) -> str | None:
    """The name, inside ``module``, of its input embedding's weight; None if it has none."""
    try:
        weight = getattr(module.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    names = (name for name, held in module.named_parameters() if held is weight)
    return next(names, None)


def _ties_on_reload(config: object) -> bool:
    """``config.tie_word_embeddings`` as ``from_pretrained`` will read it back from the saved
    ``config.json`` (its class rebuilt from ``to_dict()``): T5's config sets it True whatever
    the file says, so a T5 is re-tied even when lorakit cleared the flag. The flag as it is
    where the config cannot be rebuilt."""
    flag = bool(getattr(config, "tie_word_embeddings", False))
    rebuild, as_dict = getattr(type(config), "from_dict", None), getattr(config, "to_dict", None)
    if not (callable(rebuild) and callable(as_dict)):
        return flag
    try:
        return bool(getattr(rebuild(as_dict()), "tie_word_embeddings", flag))
    except (TypeError, ValueError, KeyError, AttributeError):  # (a config that cannot be rebuilt)
        return flag


def _give_own_tensor(model: nn.Module, name: str, paths: dict[int, int]) -> None:
    """Replace the parameter ``name`` by a clone of it (values, dtype, device, requires_grad).
    A module held under several names (``paths``: how many) is first replaced at this name by a
    shallow copy of it, so the other names keep the original tensor."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if module_name and paths.get(id(module), 1) > 1:
        module = copy.copy(module)
        module._parameters = dict(module._parameters)
        replace_module(model, module_name, module)
    old = module._parameters[attribute]
    setattr(module, attribute, nn.Parameter(old.detach().clone(), old.requires_grad))
