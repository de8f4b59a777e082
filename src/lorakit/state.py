"""Named adapters on one model: which exist, which are active, which train.

The configs live on the model as ``model.lorakit_state``; the per-layer tensors live in the LoRA
layers. Choosing adapters for a single call without touching any state (``use_adapters``,
``disabled``) is ``lorakit.adapter_choice``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import UnknownAdapterError
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.offloaded_tensors import guard_trained_biases

__all__ = [
    "AdapterState",
    "active_adapters",
    "adapter_configs",
    "adapter_model",
    "adapter_name_list",
    "adapter_tensors",
    "compute_merged_per_layer",
    "delete_adapter",
    "lora_layers",
    "parameter_holders",
    "saved_modules",
    "set_active",
    "state_of",
    "walk_modules",
]


@dataclass
class AdapterState:
    """What lorakit records on a model: each adapter's config, the active ones, and the
    ``requires_grad`` flags the parameters had before the first injection (restored by unload)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    trainable: list[nn.Parameter] = field(default_factory=list)
    """What ``set_active`` made trainable (so the next call freezes just these)."""
    prompt_styles: dict[str, str] = field(default_factory=dict)
    """``{adapter: "chat" | "plain"}``: the form of the prompts an adapter was trained on
    (``lorakit.io.save.record_prompt_style``), written into its file by every save."""


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): every name the model holds it under}``: a tied or shared parameter
    has several names (e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``)."""
    holders: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(parameter), []).append(name)
    return holders


def adapter_model(model: nn.Module) -> nn.Module:
    """The module that holds the adapters: ``model`` itself, or for lorakit's ``PeftModel``
    wrapper the transformers model inside it, or for a ``torch.compile`` wrapper
    (``OptimizedModule``) the module it compiled (PEFT's ``unwrap_compiled``), in any nesting:
    every top-level function takes any of them. (A compiled wrapper holds no state of its own:
    setting one on it would land on the model inside, over the model's own.)"""
    from lorakit.peft_compat import PeftModel  # (imports this module)

    while True:
        if isinstance(model, PeftModel):
            model = model.model
        elif type(model).__name__ == "OptimizedModule" and "_orig_mod" in model._modules:
            model = model._modules["_orig_mod"]
        else:
            return model


def state_of(model: nn.Module, create: bool = False) -> AdapterState | None:
    model = adapter_model(model)
    state = model.__dict__.get("lorakit_state")
    if state is None and create:
        state = AdapterState(
            original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()}
        )
        model.lorakit_state = state
    return state


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """``{adapter_name: LoraConfig}`` of the model's adapters (empty if it has none)."""
    state = state_of(model)
    return {} if state is None else state.configs


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    state = state_of(model)
    return () if state is None else state.active


def walk_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` like ``named_modules()``, but without descending into LoRA layers and
    saved-module wrappers (they are yielded themselves; a LoRA layer nested in another, as
    ``LoraParameter`` layers on several parameters of one module are, is yielded too, at
    ``<name>.base_layer``). Its cost does not grow with the number of adapters on the model."""
    seen: set[int] = set()
    pending: list[tuple[str, nn.Module]] = [("", adapter_model(model))]
    while pending:
        name, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, LoraLayer):
            pending.append((f"{name}.base_layer", module.base_layer))  # nested (parameters)
        if isinstance(module, (LoraLayer, ModulesToSave)):
            continue
        children = [(n, c) for n, c in module._modules.items() if c is not None]
        pending.extend((f"{name}.{n}" if name else n, c) for n, c in reversed(children))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(name, layer)`` for every LoRA layer of the model (found by type, never by name)."""
    for name, module in walk_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in walk_modules(model):
        if isinstance(module, ModulesToSave):
            yield name, module


def adapter_name_list(adapter_names: str | Sequence[str]) -> tuple[str, ...]:
    """The names as a tuple (one name given as a string is that one name, as in PEFT); a name
    given twice is a ``ValueError`` (the adapter would be added, or merged, twice)."""
    names = (adapter_names,) if isinstance(adapter_names, str) else tuple(adapter_names)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"adapter(s) {repeated} named more than once in {list(names)}; name each adapter once"
        )
    return names


def _require(model: nn.Module, adapter_names: Sequence[str]) -> AdapterState:
    state = state_of(model)
    known = [] if state is None else list(state.configs)
    unknown = [name for name in adapter_names if name not in known]
    if unknown or state is None:
        raise UnknownAdapterError(f"unknown adapter(s) {unknown}; this model has {known}")
    return state


def set_active(model: nn.Module, adapter_names: Sequence[str], *, trainable: bool = True) -> None:
    """Make exactly ``adapter_names`` active (their outputs are summed) and trainable.

    Every other adapter's tensors are frozen; the base stays frozen (it is frozen once, when the
    first adapter is injected). Biases chosen by the active configs' ``bias`` mode train too
    (offloaded later: ``guard_trained_biases``). Its cost does not grow with the adapters held.
    ``trainable=False``: only the active adapters change, every ``requires_grad`` flag stays.
    """
    adapter_names = adapter_name_list(adapter_names)
    state = _require(model, adapter_names)
    _refuse_two_copies(model, adapter_names)
    if trainable:
        for parameter in state.trainable:
            parameter.requires_grad_(False)
    state.active = tuple(adapter_names)
    chosen: list[nn.Parameter] = []
    for _, module in walk_modules(model):
        if isinstance(module, LoraLayer):
            module.active_adapters = tuple(n for n in adapter_names if n in module.ranks)
        elif isinstance(module, ModulesToSave):
            saved = module.modules_to_save
            module.active_adapters = tuple(n for n in adapter_names if n in saved)
        chosen += _owned_tensors(module, getattr(module, "active_adapters", ()))
    if not trainable:
        return
    modes = {state.configs[name].bias for name in adapter_names}
    chosen += guard_trained_biases(model, _trained_biases(model, modes))
    for parameter in chosen:
        parameter.requires_grad_(True)
    state.trainable = chosen


def _refuse_two_copies(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """``ValueError`` (before any change) when two of ``adapter_names`` each hold a trained copy
    of one module (``modules_to_save``) or token rows of one embedding
    (``trainable_token_indices``): one module's output cannot be two copies, and the forward
    would mix one adapter's copy with another's rows. PEFT refuses it too ("Only one adapter
    can be set at a time")."""
    if len(adapter_names) < 2:
        return
    for name, module in walk_modules(model):
        if isinstance(module, ModulesToSave):
            holders = [n for n in adapter_names if n in module.modules_to_save]
            if len(holders) > 1:
                raise ValueError(
                    f"adapters {holders} each hold their own copy of module {name!r} "
                    "(modules_to_save / trainable_token_indices), and one module computes one "
                    "copy: activate one of them at a time (PEFT refuses it too)."
                )


def compute_merged_per_layer(model: nn.Module) -> None:
    """PEFT's rule for a model some of whose layers are merged (``merge_adapter``, named or
    not, once or several times): a LoRA layer holding merged adapters computes exactly those
    (its merged weight ``W0 + sum_a s_a B_a A_a`` over ``layer.merged_adapters``, nothing
    added), every other LoRA layer the model's active adapters that it has. The active adapters
    and every ``requires_grad`` flag stay as they are; ``set_active`` makes the layers agree
    again."""
    state = _require(model, ())
    for _, layer in lora_layers(model):
        active_here = tuple(name for name in state.active if name in layer.ranks)
        layer.active_adapters = tuple(layer.merged_adapters) or active_here


def adapter_tensors(
    model: nn.Module, adapter_names: Sequence[str] | None = None
) -> list[nn.Parameter]:
    """The tensors the adapters ``adapter_names`` (None: every adapter) own, each once: LoRA
    factors, DoRA magnitudes and ``lora_bias`` vectors of every LoRA layer, and the
    ``modules_to_save`` copies and trainable-token rows of every saved module (what
    ``set_active`` makes trainable, and PEFT's ``set_requires_grad(names)`` and
    ``disable_adapter_layers()`` switch); the base model's own biases (``bias="all"`` /
    ``"lora_only"``) are not among them."""
    tensors: dict[int, nn.Parameter] = {}
    for _, module in walk_modules(model):
        tensors.update((id(p), p) for p in _owned_tensors(module, adapter_names))
    return list(tensors.values())


def _owned_tensors(module: nn.Module, adapter_names: Sequence[str] | None) -> list[nn.Parameter]:
    """``adapter_tensors`` of one module: a LoRA layer's or a saved module's tensors of
    ``adapter_names`` (None: all of its adapters); none for any other module."""
    if isinstance(module, LoraLayer):
        owned, tensors_of = module.ranks, module.adapter_parameters
    elif isinstance(module, ModulesToSave):
        owned = module.modules_to_save
        tensors_of = lambda name: list(owned[name].parameters())  # noqa: E731
    else:
        return []
    names = owned if adapter_names is None else adapter_names
    return [p for name in names if name in owned for p in tensors_of(name)]


def freeze_all(model: nn.Module) -> None:
    """Freeze every parameter (done once, before the first adapter is injected)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _trained_biases(model: nn.Module, modes: set[str]) -> list[nn.Parameter]:
    """The biases that ``bias="all"`` (every bias of the base model, not of saved-module
    originals) or ``bias="lora_only"`` (the adapted layers' biases) trains."""
    if "all" in modes:
        modules = (
            module.base_layer if isinstance(module, LoraLayer) else module
            for _, module in walk_modules(model)
            if not isinstance(module, ModulesToSave)
        )
    elif "lora_only" in modes:
        modules = (layer.base_layer for _, layer in lora_layers(model) if layer.active_adapters)
    else:
        return []
    biases = (getattr(module, "bias", None) for module in modules)
    return [bias for bias in biases if isinstance(bias, nn.Parameter)]


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter's tensors and config (its merge, if any, is undone first).

    All or nothing, as ``lorakit.merge``: where the adapter is merged, the other merged
    adapters are merged back, and every layer's re-merge is computed and checked
    (``LoraLayer.prepare_delete``) before any layer changes; a ValueError (a remaining
    adapter holds inf/NaN) names the module and leaves the model as it was."""
    state = _require(model, [adapter_name])
    layers = [(path, layer) for path, layer in lora_layers(model) if adapter_name in layer.ranks]
    remerges = []
    for path, layer in layers:
        try:
            remerges.append(layer.prepare_delete(adapter_name))
        except ValueError as error:  # name the layer: the message names the adapters only
            error.args = (
                f"module {path!r}: deleting merged adapter {adapter_name!r} merges the others "
                f"back: {error} Fix that adapter, or unmerge (lorakit.unmerge) before deleting.",
                *error.args[1:],
            )
            raise
    for (_, layer), remerge in zip(layers, remerges, strict=True):
        layer.delete_adapter(adapter_name, remerge)
    for _, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
    del state.configs[adapter_name]
    state.prompt_styles.pop(adapter_name, None)
    state.active = tuple(n for n in state.active if n != adapter_name)
