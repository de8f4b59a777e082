"""Put LoRA adapters into a model (``inject``) and take them out again (``unload``, from
``lorakit.unload`` with ``freeze_adapter`` and ``forget_state``: it puts back the very same
module objects). ``inject`` wraps each target module in place (the original object becomes
``base_layer``), freezes everything except the new adapter (and the biases chosen by ``bias``,
and ``modules_to_save``), and records the config on the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit import offloading
from lorakit.base_rewrite import BaseRewrite, interrupts_held, plan_rewrite, write_rewrites
from lorakit.config import LoraConfig
from lorakit.dora_norms import ZeroRowNormsError
from lorakit.init_methods import changes_base
from lorakit.inject_checks import (
    check_adapter_fits,
    check_adapter_name,
    check_one_bias_adapter,
    warn_lora_bias_without_base_bias,
)
from lorakit.layer_wrapping import (
    current_modules,
    default_adapter_dtype,
    give_layer_mode,
    wrap_targets,
)
from lorakit.layers import LoraLayer
from lorakit.moe_targets import convert_moe_config
from lorakit.parameter_targets import (
    find_parameter_targets,
    wrap_parameter_targets,
)
from lorakit.replication import replicate_layers, restore_layers
from lorakit.state import (
    adapter_model,
    lora_layers,
    saved_modules,
    set_active,
    state_of,
)
from lorakit.target_errors import check_every_entry_matches, no_match_message
from lorakit.targets import find_targets
from lorakit.uncalled_embeddings import warn_uncalled_tied_embeddings
from lorakit.unload import forget_state, freeze_adapter, unload
from lorakit.wrapped_modules import (
    add_to_wrappers,
    replace_module,
    saved_module_names,
    token_module_names,
)

__all__ = [
    "add_adapter_to_modules",
    "forget_state",
    "freeze_adapter",
    "inject",
    "unload",
]


def inject(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    adapter_dtype: torch.dtype | None = None,
    activate: bool = True,
    initialize: bool = True,
    strict_targets: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to ``model`` (in place) and return it.

    Adapter tensors are created in ``adapter_dtype`` (default: float32 on a float16/bfloat16 base,
    otherwise the base dtype) on the base weight's device. With ``activate`` the new adapter
    becomes the only active one and the only trainable one. ``initialize=False`` leaves the
    adapter tensors uninitialised, for callers that copy values in right away (loading a file).
    New LoRA layers take the training mode of the module they wrap: in an eval-mode model LoRA
    dropout stays off until ``model.train()``.

    ``strict_targets``: every entry of a list ``target_modules`` must match a module, else
    ``TargetModulesError`` names the entries and the closest module names (a typo is not
    dropped silently, as PEFT does when another entry matches). False accepts such entries,
    as PEFT does (for configs written elsewhere, e.g. for another model family).
    """
    wrapper, model = model, adapter_model(model)  # a PeftModel: the model inside holds them
    check_adapter_name(model, adapter_name)
    check_one_bias_adapter(model, adapter_name, config.bias)
    replicated = config.layer_replication and replicate_layers(model, config.layer_replication)
    try:
        _inject_checked(
            model, config, adapter_name, adapter_dtype, activate, initialize, strict_targets
        )
    except BaseException:
        if replicated:
            restore_layers(model)
        raise
    return wrapper


def _inject_checked(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    adapter_dtype: torch.dtype | None,
    activate: bool,
    initialize: bool,
    strict_targets: bool,
) -> None:
    """``inject`` once the name is checked and the layers replicated (if asked). The config of
    a fused MoE model is first converted as PEFT converts it (``lorakit.moe_targets``). A
    targeted embedding the forward never calls (T5's / BART's ``shared``) is adapted as PEFT
    adapts it, with an ``UnusedTargetWarning`` naming the modules to target instead."""
    written, config = config.target_parameters or [], convert_moe_config(model, config)
    targets = find_targets(model, config)
    parameter_targets = find_parameter_targets(model, config, written=written)
    if not targets and not parameter_targets:
        raise ValueError(no_match_message(model, config))
    if strict_targets:
        check_every_entry_matches(model, config)
    warn_lora_bias_without_base_bias(model, config, targets)
    offloading.check_no_offloaded_bias(model, config, targets, parameter_targets)
    warn_uncalled_tied_embeddings(model, targets)  # (T5's / BART's ``shared``)
    add_adapter_to_modules(
        model,
        config,
        adapter_name,
        targets,
        saved_module_names(model, config),
        adapter_dtype=adapter_dtype,
        activate=activate,
        init=config.init_lora_weights if initialize else None,
        parameter_targets=parameter_targets,
    )


def add_adapter_to_modules(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    targets: list[str],
    saved_names: list[str],
    *,
    modules: Mapping[str, nn.Module] | None = None,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    adapter_dtype: torch.dtype | None = None,
    activate: bool = True,
    init: bool | str | None = True,
    parameter_targets: Mapping[str, str] | None = None,
) -> None:
    """``inject`` once the targets are known (``find_targets``) and the name checked.

    ``modules``: the model's modules as they are now, LoRA layers included
    (``dict(walk_modules(model))``), to save the lookups; ``factors[name] = (A, B)``: tensors
    the new adapter of LoRA layer ``name`` takes as its weights (no copy when dtype and device
    already fit: the caller hands them over); ``init``: ``LoraConfig.init_lora_weights``, or
    None for uninitialised tensors; ``parameter_targets``: ``{layer path: parameter path}``
    of the bare parameters to adapt (``lorakit.parameter_targets``; ``factors`` keyed by layer
    path too).
    """
    current = current_modules(model, targets, modules)
    tokens = token_module_names(model, config, targets, saved_names)
    parameter_targets = dict(parameter_targets or {})
    check_adapter_fits(  # all checks first
        model, config, adapter_name, init, current, saved_names, tokens, parameter_targets
    )
    first = state_of(model) is None
    before = {**current, **{name: model.get_submodule(name) for name in [*saved_names, *tokens]}}
    try:  # what can still fail (an init's SVD, memory) undoes every change: all or nothing
        layers = wrap_targets(model, targets, modules=current)
        layers |= wrap_parameter_targets(model, parameter_targets)
        rewrites = _add_to_layers(  # PiSSA / OLoRA / LoftQ: W_res planned, written last
            layers, config, adapter_name, init, adapter_dtype, factors or {}, parameter_targets
        )
        add_to_wrappers(model, adapter_name, saved_names, tokens, init)
    except BaseException:
        _undo_adapter(model, adapter_name, before, first)
        raise
    with interrupts_held():  # a Ctrl-C while W_res is written lands once inject is done
        try:
            write_rewrites(rewrites)  # on a failure it puts back what it wrote
        except BaseException:
            _undo_adapter(model, adapter_name, before, first)
            raise
        _register_adapter(model, config, adapter_name, activate, [*layers, *saved_names, *tokens])


def _add_to_layers(
    layers: Mapping[str, LoraLayer],
    config: LoraConfig,
    adapter_name: str,
    init: bool | str | None,
    adapter_dtype: torch.dtype | None,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    parameter_targets: Mapping[str, str],
) -> list[BaseRewrite]:
    """Add the adapter to every wrapped layer in ``layers`` (``{path: layer}``) with
    ``_add_to_layer``: ``factors[path] = (A, B)`` where given, rank and alpha from the patterns
    matched against the parameter path for a bare parameter (``parameter_targets``), else the
    layer path. Returns the base rewrites to ``W_res`` planned (PiSSA / OLoRA / LoftQ)."""
    rewrites: list[BaseRewrite] = []
    for name, layer in layers.items():
        pattern_name = parameter_targets.get(name, name)  # rank_pattern sees parameter paths
        values = factors.get(name)
        try:
            rewrite = _add_to_layer(
                layer, config, adapter_name, pattern_name, init, adapter_dtype, values
            )
        except ZeroRowNormsError as error:  # (DoRA on zero rows of W0: name the layer)
            error.args = (f"layer {name!r}: {error}",)
            raise
        rewrites += [rewrite] if rewrite else []
    return rewrites


def _register_adapter(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    activate: bool,
    module_names: list[str],
) -> None:
    """Record the added adapter's ``config`` in the model's state; make it the active adapter
    when ``activate`` or when it is the model's only one; freeze its tensors in
    ``module_names`` when it stays inactive or ``config.inference_mode`` (PEFT's)."""
    state = state_of(model)
    state.configs[adapter_name] = config
    if activate or len(state.configs) == 1:
        set_active(model, [adapter_name])
    if config.inference_mode or not (activate or len(state.configs) == 1):
        # inference_mode (PEFT's) or a new inactive adapter: its tensors frozen, no more
        freeze_adapter(model, adapter_name, module_names)


def _add_to_layer(
    layer: LoraLayer,
    config: LoraConfig,
    adapter_name: str,
    pattern_name: str,
    init: bool | str | None,
    adapter_dtype: torch.dtype | None,
    values: tuple[torch.Tensor, torch.Tensor] | None,
) -> BaseRewrite | None:
    """Add the adapter to one wrapped layer: its rank and alpha from ``config``'s patterns
    (matched against ``pattern_name``), its factors given (``values``: (A, B)) or
    initialised by ``init``, its train/eval mode from the model's. PiSSA / OLoRA / LoftQ take
    the factors from W0 and return the base's rewrite to ``W_res`` (``lorakit.base_rewrite``),
    not yet written."""
    layer.add_adapter(
        adapter_name,
        rank=config.rank_for(pattern_name),
        alpha=config.alpha_for(pattern_name),
        dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init=init,
        dtype=adapter_dtype or default_adapter_dtype(layer.base_float_dtype),
        values=values,
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
    )
    rewrite = None
    if changes_base(init):  # PiSSA / OLoRA / LoftQ: A, B from W0, which becomes W_res
        rewrite = plan_rewrite(layer, pattern_name, adapter_name, init, config.loftq_config)
        with torch.no_grad():
            for factor, value in ((layer.lora_A, rewrite.lora_A), (layer.lora_B, rewrite.lora_B)):
                factor[adapter_name].weight.copy_(value)
    give_layer_mode(layer, adapter_name)
    return rewrite


def _undo_adapter(
    model: nn.Module,
    adapter_name: str,
    before: Mapping[str, nn.Module],
    first: bool,
) -> None:
    """Take back what a failed ``add_adapter_to_modules`` did (the base weights are its
    caller's: ``write_rewrites`` puts them back): either every wrapping goes (``first``: the
    model held no adapter before) or the adapter is removed from the modules holding it and
    the modules this call wrapped (``before``: name -> the module there before the call) are
    unwrapped."""
    if first:
        if state_of(model) is not None:
            unload(model)  # (layer_replication is restored by inject)
        return
    for name, layer in reversed(list(lora_layers(model))):  # a nested layer first
        if adapter_name in layer.ranks:
            layer.delete_adapter(adapter_name)
        layer.base_fingerprints_before_init.pop(adapter_name, None)
        if name in before and not isinstance(before[name], LoraLayer):
            replace_module(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
        if name in before and before[name] is not wrapper:
            replace_module(model, name, before[name])
