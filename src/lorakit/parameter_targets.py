"""Which bare parameters a ``LoraConfig`` adapts (``target_parameters``), and their LoRA layers.

A parameter ``<module>.<name>`` is a target when it equals an entry of ``target_parameters`` or
ends in ``"." + entry`` (PEFT's rule); only a module's own parameters count (not those of its
children). Each target gets a ``LoraParameter`` layer (``lorakit.layers.parameter``); several
targets of one module nest, the first in the module's parameter order innermost, so the layer
of the k-th of n targets of module ``m`` is at ``m`` followed by ``.base_layer`` (n - 1 - k)
times: the paths of PEFT's keys. ``find_parameter_targets`` is pure (it works on a model with
or without adapters); ``check_parameter_targets`` refuses a conflict before
``wrap_parameter_targets`` puts the layers in.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetModulesError
from lorakit.layers import LoraLayer
from lorakit.layers.parameter import LoraParameter, owner_of, parameter_layout
from lorakit.state import lora_layers
from lorakit.targets import in_selected_layer, matches, model_modules
from lorakit.wrapped_modules import replace_module

__all__ = [
    "check_parameter_targets",
    "find_parameter_targets",
    "parameter_layer_paths",
    "parameter_stand_ins",
    "unmatched_parameter_entries",
    "wrap_parameter_targets",
]


def _matches(entries: list[str], parameter_path: str) -> bool:
    return any(parameter_path == e or parameter_path.endswith("." + e) for e in entries)


def find_parameter_targets(
    model: nn.Module,
    config: LoraConfig,
    modules: Mapping[str, nn.Module] | None = None,
    *,
    file_config: bool = False,
    written: list[str] | None = None,
) -> dict[str, str]:
    """``{LoRA layer path: parameter path}`` of the parameters ``config.target_parameters``
    names, in model order (empty without ``target_parameters``). ``TargetModulesError`` (a
    ``UserError``) for an entry that matches no parameter, a matched parameter that is not 2-D
    or 3-D, or a set of parameters other than the one earlier adapters of ``model`` adapt
    (PEFT's rule: the layers are shared), and (a config written for ``inject``) a parameter
    that ``exclude_modules`` or ``layers_to_transform`` would leave out (``_check_not_left_out``).
    ``modules``: ``dict(model_modules(model))``. ``file_config=True`` (a file's config, or the
    one a model records, which may be a file's: its tensors decide what is loaded, as PEFT loads
    it): only an entry list of which no entry matches is refused, and every matched parameter is
    a target whatever ``exclude_modules`` / ``layers_to_transform`` say (PEFT applies them to
    ``target_modules`` only and adapts, and saves, the parameter in every layer). ``written``:
    the ``target_parameters`` the user wrote, where ``config`` is what
    ``moe_targets.convert_moe_config`` made of them (None: all of ``config``'s): only a
    parameter one of them matches is refused as left out; one that only an entry the
    conversion generated from a transformers-4 name matches is adapted in every layer, as PEFT
    adapts it."""
    entries = config.target_parameters or []
    if not entries:
        return {}
    named = model_modules(model) if modules is None else modules.items()
    by_owner: dict[str, list[str]] = {}
    for owner, module in named:
        for name, parameter in module.named_parameters(recurse=False):
            path = f"{owner}.{name}" if owner else name
            if _matches(entries, path):
                _check_parameter(model, owner, path, parameter)
                if not file_config and (written is None or _matches(written, path)):
                    _check_not_left_out(config, path)
                by_owner.setdefault(owner, []).append(name)
    found = parameter_layer_paths(by_owner)
    unmatched = unmatched_parameter_entries(entries, found)
    if unmatched and (not file_config or len(unmatched) == len(entries)):
        raise TargetModulesError(
            f"target_parameters entries {unmatched} match no parameter of this "
            f"{type(model).__name__} (an entry is a parameter's full name or its last dotted "
            f"parts, e.g. 'experts.gate_up_proj'); parameters held directly by modules: "
            f"{_parameter_endings(model)[:20]}."
        )
    _check_same_as_before(model, found)
    return found


def unmatched_parameter_entries(entries: list[str], found: Mapping[str, str]) -> list[str]:
    """The entries of ``entries`` (``target_parameters``) that match none of the parameter
    paths of ``found`` (``find_parameter_targets``' result), in their order."""
    return [entry for entry in entries if not any(_matches([entry], p) for p in found.values())]


def _check_not_left_out(config: LoraConfig, path: str) -> None:
    """``TargetModulesError`` when ``exclude_modules`` or ``layers_to_transform`` would leave
    out the parameter at ``path``: PEFT applies them to ``target_modules`` only and adapts a
    ``target_parameters`` match anyway. For a config given to ``inject`` (written by a person,
    checked strictly as every ``target_modules`` entry is) lorakit refuses rather than ignore
    what was asked; a file's config is loaded as PEFT loads it (``file_config=True``)."""
    owner = path.rpartition(".")[0]
    if config.exclude_modules is not None and (
        matches(config.exclude_modules, owner) or matches(config.exclude_modules, path)
    ):
        field, value = "exclude_modules", config.exclude_modules
    elif not in_selected_layer(config, path):
        field, value = "layers_to_transform", config.layers_to_transform
    else:
        return
    raise TargetModulesError(
        f"target_parameters matches {path!r}, which {field}={value!r} leaves out; {field} "
        "applies to target_modules only (as in PEFT, which would adapt the parameter anyway). "
        f"Drop {field} and name only the parameters to adapt in target_parameters (full names "
        f"such as {path!r} work)."
    )


def _check_parameter(model: nn.Module, owner: str, path: str, parameter: nn.Parameter) -> None:
    if not owner:
        raise TargetModulesError(
            f"target_parameters matches {path!r}, a parameter of the top-level "
            f"{type(model).__name__} itself; only parameters of its submodules can be adapted."
        )
    try:
        parameter_layout(parameter, transposed=False)
    except ValueError as error:
        raise TargetModulesError(
            f"target_parameters matches {path!r}, {error}: only 2-D (d, k) and 3-D (experts, "
            "d, k) parameters can be adapted; remove the entry or make it more specific."
        ) from None


def parameter_layer_paths(by_owner: Mapping[str, list[str]]) -> dict[str, str]:
    """``{layer path: parameter path}`` for ``{module path: its targeted parameter names, in
    the module's order}``: the last at the module's path, each earlier one a ``.base_layer``
    deeper (the nesting PEFT uses)."""
    paths = {}
    for owner, names in by_owner.items():
        for index, name in enumerate(names):
            depth = len(names) - 1 - index
            paths[owner + ".base_layer" * depth] = f"{owner}.{name}"
    return paths


def _parameter_endings(model: nn.Module) -> list[str]:
    """``<module leaf>.<parameter>`` for the parameters modules hold directly (for messages)."""
    endings = set()
    for owner, module in model_modules(model):
        for name, _ in module.named_parameters(recurse=False):
            endings.add(f"{owner.rsplit('.', 1)[-1]}.{name}" if owner else name)
    return sorted(endings)


def _check_same_as_before(model: nn.Module, found: Mapping[str, str]) -> None:
    before = {
        layer_path: layer.parameter_path(layer_path)
        for layer_path, layer in lora_layers(model)
        if isinstance(layer, LoraParameter)
    }
    if before and before != dict(found):
        raise TargetModulesError(
            f"the model's adapters already adapt the parameters {sorted(before.values())}; "
            "every adapter with target_parameters must adapt the same set (as in PEFT), got "
            f"{sorted(found.values())}."
        )


def check_parameter_targets(
    model: nn.Module, targets: Mapping[str, str], adapter_name: str, module_targets=()
) -> None:
    """Raise before anything is wrapped (``inject`` is all or nothing): a parameter of
    ``targets`` (from ``find_parameter_targets``) whose module is adapted through
    ``target_modules`` (already, or in this call: ``module_targets``), or that already has an
    adapter named ``adapter_name``. Changes nothing."""
    module_targets = set(module_targets)
    for parameter_path in targets.values():
        owner, _, name = parameter_path.rpartition(".")
        current = model.get_submodule(owner)
        layer = _layer_for(current, name)
        if layer is not None:
            if adapter_name in layer.ranks:
                raise ValueError(
                    f"parameter {parameter_path!r} already has an adapter named "
                    f"{adapter_name!r}; choose another adapter_name or delete that adapter."
                )
            continue
        if owner in module_targets or (
            isinstance(current, LoraLayer) and not isinstance(current, LoraParameter)
        ):
            raise TargetModulesError(
                f"module {owner!r} is adapted through target_modules; its parameter "
                f"{name!r} cannot also be in target_parameters. Target it one way only "
                "(without target_modules, the model type's default modules are adapted)."
            )


def wrap_parameter_targets(
    model: nn.Module, targets: Mapping[str, str]
) -> dict[str, LoraParameter]:
    """Put a ``LoraParameter`` layer (no adapter yet) on each target of ``targets`` (from
    ``find_parameter_targets``, checked by ``check_parameter_targets``) that has none; returns
    ``{layer path: layer}``. The model's adapter state must exist (``layer_wrapping.wrap_targets``
    creates it)."""
    by_owner: dict[str, list[str]] = {}
    for parameter_path in targets.values():
        owner, _, name = parameter_path.rpartition(".")
        by_owner.setdefault(owner, []).append(name)
    for owner, names in by_owner.items():
        for name in names:  # innermost first
            current = model.get_submodule(owner)
            if _layer_for(current, name) is not None:
                continue
            layer = LoraParameter(current, name)
            layer.training = owner_of(current).training
            replace_module(model, owner, layer)
    return {path: model.get_submodule(path) for path in targets}


def _layer_for(module: nn.Module, parameter_name: str) -> LoraParameter | None:
    """The ``LoraParameter`` layer of ``parameter_name`` among those nested at ``module``."""
    while isinstance(module, LoraParameter):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def parameter_stand_ins(
    parameter_targets: dict[str, str], current: dict[str, nn.Module]
) -> dict[str, nn.Module]:
    """``{layer path: a module whose base weight is the parameter}`` for the fingerprint check
    of a load (``lorakit.io.fingerprint`` reads a module's base weight):
    the ``LoraParameter`` layer already there, or a stand-in holding the parameter as
    ``weight``."""
    views: dict[str, nn.Module] = {}
    for layer_path, parameter_path in parameter_targets.items():
        if isinstance(current.get(layer_path), LoraParameter):
            views[layer_path] = current[layer_path]
            continue
        owner, _, name = parameter_path.rpartition(".")
        view = nn.Module()
        view.weight = getattr(owner_of(current[owner]), name)
        views[layer_path] = view
    return views
