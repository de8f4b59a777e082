"""What ``inject`` checks before it changes anything: the adapter's name, and that every target,
saved module and trainable-token module can take the adapter (layer kind, DoRA / ``lora_bias``
support, a base-changing init's rank, dtype and shared weights, bare parameter targets, no
parent's offloading hook). Each refusal names the module and says what to do; a model refused
here is left untouched."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from lorakit import quantized
from lorakit.config import LoraConfig, pattern_matches
from lorakit.errors import TargetModulesError
from lorakit.fan_in_fan_out import fan_in_fan_out_flips, settle_fan_in_fan_out
from lorakit.init_checks import check_layer_takes
from lorakit.init_methods import changes_base
from lorakit.layers import LoraLayer, TrainableTokens, layer_class_for
from lorakit.layers.parameter import LoraParameter
from lorakit.layers.saved import check_saveable
from lorakit.offloading import check_no_offloaded_bnb, check_no_parent_offload
from lorakit.parameter_targets import check_parameter_targets
from lorakit.state import adapter_configs, lora_layers, parameter_holders, saved_modules
from lorakit.targets import original_module
from lorakit.wrapped_modules import check_saved_not_nested, check_wrapper_kind

__all__ = [
    "check_adapter_fits",
    "check_adapter_name",
    "check_one_bias_adapter",
    "fan_in_fan_out_flips",
    "quantized_format",
    "warn_lora_bias_without_base_bias",
]

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_fits(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    init: bool | str | None,
    current: Mapping[str, nn.Module],
    saved_names: Sequence[str],
    tokens: Sequence[str],
    parameter_targets: Mapping[str, str],
    *,
    warn: bool = True,
) -> None:
    """Refuse (``ValueError`` / ``TypeError`` naming the module) an adapter that some module
    cannot take: ``current`` the targets as they are now (name -> module), ``saved_names`` the
    ``modules_to_save``, ``tokens`` the trainable-token modules, ``parameter_targets``
    ``{layer path: parameter path}`` of bare parameters; ``init``: ``init_lora_weights``.
    ``warn=False``: the checks alone, without what the injection itself does once they pass:
    warn about pattern keys that match nothing, and settle ``config.fan_in_fan_out`` on the
    layout of the layers it wraps, warning where that changes it (as PEFT's dispatch does:
    ``fan_in_fan_out.settle_fan_in_fan_out``)."""
    for name in [*saved_names, *tokens]:
        check_wrapper_kind(model.get_submodule(name), name, name in tokens)
    check_saved_not_nested(model, config, list(saved_names))
    for name in saved_names:  # a full copy of a quantized layer would train nothing
        check_saveable(model.get_submodule(name), name)
    check_no_parent_offload(model, [*current, *parameter_targets, *saved_names, *tokens])
    check_no_offloaded_bnb(model, list(current))
    _check_saved_apart_from_parameters(model, saved_names, parameter_targets)
    _check_targets(model, current, config, adapter_name, init)
    check_parameter_targets(model, parameter_targets, adapter_name, list(current))
    if warn:
        settle_fan_in_fan_out(config, current)
        _warn_unmatched_pattern_keys(config, [*current, *parameter_targets.values()])


def _check_saved_apart_from_parameters(
    model: nn.Module, saved_names: Sequence[str], parameter_targets: Mapping[str, str]
) -> None:
    """``TargetModulesError`` when a module copied whole (``modules_to_save``, this call's or an
    earlier adapter's) owns, contains or lies inside the module of an adapted bare parameter
    (``target_parameters``, this call's or an earlier adapter's): both the copy and the
    parameter's LoRA factors would train, and the file would load nowhere (PEFT refuses
    ``modules_to_save`` on a ``ParamWrapper``)."""
    parameters = {*parameter_targets.values(), *_adapted_parameters(model)}
    if not parameters:  # (the common case; the walks cost no more with more adapters)
        return
    saved = {*saved_names, *_saved_wrappers(model)}
    for module in sorted(saved):
        for parameter in sorted(parameters):
            owner = parameter.rpartition(".")[0]
            if owner == module:
                relation = "owns"
            elif owner.startswith(module + "."):
                relation = "contains the module of"
            elif module.startswith(owner + "."):
                relation = "lies inside the module of"
            else:
                continue
            raise TargetModulesError(
                f"module {module!r} is in modules_to_save and {relation} parameter "
                f"{parameter!r}, which target_parameters adapts; a module cannot be both copied "
                "whole and adapted through its parameters (PEFT refuses this too). Drop it from "
                "modules_to_save or drop the parameter from target_parameters."
            )


def _saved_wrappers(model: nn.Module) -> list[str]:
    """Paths of the modules earlier adapters copy whole (``ModulesToSave``, not token rows)."""
    return [
        name for name, module in saved_modules(model) if not isinstance(module, TrainableTokens)
    ]


def _adapted_parameters(model: nn.Module) -> list[str]:
    """Paths of the bare parameters earlier adapters adapt (``LoraParameter`` layers)."""
    return [
        layer.parameter_path(path)
        for path, layer in lora_layers(model)
        if isinstance(layer, LoraParameter)
    ]


def warn_lora_bias_without_base_bias(model: nn.Module, config: LoraConfig, targets) -> None:
    """Warn (at ``inject``; a load says it when a merge is asked), naming the first few such
    modules, when ``lora_bias=True`` targets layers whose base has no bias (as PEFT warns): the
    adapter trains and runs, but merging it (``merge``, ``merge_and_unload``) is refused
    there, having no base bias to add ``s b`` to."""
    if not config.lora_bias:
        return
    no_bias = [
        name
        for name in targets
        if getattr(original_module(model.get_submodule(name)), "bias", None) is None
    ]
    if no_bias:
        more = f" (and {len(no_bias) - 3} more)" if len(no_bias) > 3 else ""
        warnings.warn(
            f"lora_bias=True, but the base layer of target module(s) {no_bias[:3]}{more} has no "
            "bias: the adapter trains and runs, but it cannot be merged into those layers "
            "(merge / merge_and_unload will refuse). Target layers with a bias, or set "
            "lora_bias=False to be able to merge.",
            stacklevel=4,
        )


def _check_targets(
    model: nn.Module,
    current: Mapping[str, nn.Module],
    config: LoraConfig,
    adapter_name: str,
    init: bool | str | None,
) -> None:
    """Raise ``ValueError`` naming the first target that cannot take this adapter: DoRA or a
    bias on B on a layer kind without it, the name already taken, a base-changing init it
    cannot do (``check_layer_takes``: layer kind, dtype, a rank above min(d, k), a weight
    shared with other modules)."""
    holders = parameter_holders(model) if changes_base(init) else {}
    for name, module in current.items():
        layer_class = layer_class_for(module, name)
        if config.use_dora and not layer_class.supports_dora:
            raise ValueError(_no_dora_here(module, name))
        if config.lora_bias and not layer_class.supports_lora_bias:
            raise ValueError(_no_lora_bias_here(module, name))
        if isinstance(module, LoraLayer) and adapter_name in module.ranks:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}.")
        if changes_base(init):
            weight = getattr(getattr(module, "base_layer", module), "weight", None)
            own = (f"{name}.weight", f"{name}.base_layer.weight")
            shared = [n for n in holders.get(id(weight), ()) if n not in own]
            check_layer_takes(
                layer_class, module, name, init, config.rank_for(name), shared_with=shared
            )


def quantized_format(module: nn.Module) -> str | None:
    """The quantized storage format of the layer ``module`` stands for (``bnb-nf4-dq``,
    ``torchao-int8-weight-only``, ...; ``lorakit.quantized``), or None for a float layer."""
    base = original_module(module)
    return quantized.describe(base) if quantized.is_quantized(base) else None


def _no_dora_here(module: nn.Module, name: str) -> str:
    """Why target ``name`` cannot take DoRA (a quantized base, or a layer kind without it)."""
    fmt = quantized_format(module)
    if fmt is not None:
        return (
            f"module {name!r} is quantized ({fmt}): lorakit implements DoRA (use_dora=True) "
            "for float nn.Linear and transformers Conv1D layers only, not on a quantized base "
            "(docs/quantized.md); set use_dora=False, or adapt a float copy of the model."
        )
    return (
        f"module {name!r} is a {type(original_module(module)).__name__}: lorakit "
        "implements DoRA (use_dora=True) for nn.Linear and transformers Conv1D only; "
        "remove it from target_modules (or add it to exclude_modules)."
    )


def _no_lora_bias_here(module: nn.Module, name: str) -> str:
    """Why target ``name`` cannot take ``lora_bias`` (a quantized base, or a layer kind
    without it)."""
    fmt = quantized_format(module)
    if fmt is not None:
        return (
            f"module {name!r} is quantized ({fmt}): lorakit implements lora_bias=True (a bias "
            "on B) for float nn.Linear and transformers Conv1D layers only, not on a quantized "
            "base (docs/quantized.md); set lora_bias=False, or adapt a float copy of the model."
        )
    return (
        f"module {name!r} is a {type(original_module(module)).__name__}: lorakit "
        "implements lora_bias=True (a bias on B) for float nn.Linear and transformers "
        "Conv1D layers only; remove it from target_modules (or add it to "
        "exclude_modules), or set lora_bias=False."
    )


def check_adapter_name(model: nn.Module, adapter_name: str) -> None:
    """Refuse a malformed adapter name (ValueError) or one ``model`` already holds."""
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise ValueError(
            f"adapter_name={adapter_name!r} is invalid: use letters, digits, '_' or '-' only "
            "(it becomes part of parameter names and file paths)."
        )
    if adapter_name in adapter_configs(model):
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; choose another name or "
            "delete it first with lorakit.delete_adapter(model, name)."
        )


def check_one_bias_adapter(model: nn.Module, adapter_name: str, bias: str) -> None:
    """Refuse (ValueError) adding adapter ``adapter_name`` with ``bias`` when the model would
    then hold more than one adapter that trains biases (``bias`` "all" / "lora_only"): those
    biases are the base model's own, so two such adapters would train and save the same
    tensors (PEFT's rule). Adapters with ``bias="none"`` may sit beside one that trains biases
    (as in PEFT; they compute with the biases as that adapter left them)."""
    configs = adapter_configs(model)
    with_bias = [name for name, config in configs.items() if config.bias != "none"]
    if bias == "none" or not with_bias:
        return
    raise ValueError(
        f"adapters {[*with_bias, adapter_name]} would all train the base model's biases "
        f"(bias != 'none'; {adapter_name!r} has bias={bias!r}), the same tensors; only one "
        f"adapter may have a bias: set bias='none' for {adapter_name!r} (or delete {with_bias} "
        "first)."
    )


def _warn_unmatched_pattern_keys(config: LoraConfig, targeted: Sequence[str]) -> None:
    """Warn (``RuntimeWarning``, as PEFT does) naming the ``rank_pattern`` / ``alpha_pattern``
    keys that match none of the ``targeted`` module (or bare parameter) names: such a key
    changes nothing, most often because of a typo or a name from another model family."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, field_name)
        unmatched = [
            key for key in pattern if not any(pattern_matches(key, name) for name in targeted)
        ]
        if unmatched:
            warnings.warn(
                f"LoraConfig.{field_name} keys {unmatched} match no targeted module and change "
                f"nothing (targeted modules, e.g.: {list(targeted[:3])}); a key is a regex for a "
                "module's full name or a dotted suffix of it, e.g. 'q_proj' or 'layers.0.mlp'.",
                RuntimeWarning,
                stacklevel=4,
            )
