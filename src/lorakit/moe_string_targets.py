"""A string ``target_modules`` (``"all-linear"`` or a regex) on a fused-MoE model, resolved to
the leaf names PEFT's conversion takes (``lorakit.moe_targets.convert_moe_config``; PEFT's
``_resolve_string_target_modules``): the last name parts of the linear layers all-linear
selects, or of the modules and parameters a regex matches in full, plus the family's
transformers-4 names whose places ``exclude_modules`` / ``modules_to_save`` do not leave out;
and the check that a regex selects no module no layer wraps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetModulesError
from lorakit.layers import UnsupportedModuleError, layer_class_for
from lorakit.targets import find_targets, matches, model_modules

__all__ = ["check_regex_modules", "resolve_string_targets"]


def resolve_string_targets(
    model: nn.Module, config: LoraConfig, renamed: dict[str, str]
) -> set[str]:
    """The leaf names a string ``target_modules`` stands for on ``model`` (PEFT's
    ``_resolve_string_target_modules``; see the module docstring)."""
    parameters = list(_original_parameter_names(model))
    if config.targets_all_linear:
        linear = find_targets(
            model, LoraConfig(target_modules="all-linear", task_type=config.task_type)
        )
        names = {name.rsplit(".", 1)[-1] for name in linear} | set(renamed)
        return {
            name
            for name in names
            if name not in renamed
            or not _left_out_everywhere(config, parameters, name, renamed[name])
        }
    spec = config.target_modules
    modules = [name for name, _ in model_modules(model) if name]
    entries = {name.rsplit(".", 1)[-1] for name in modules} | set(renamed)
    resolved = {
        leaf
        for name in [*modules, *parameters]
        if matches(spec, name) and not _left_out(config, name)
        for leaf in [name.rsplit(".", 1)[-1]]
        if leaf in entries  # a parameter's 'weight', 'bias', 'gate_up_proj': no module's name
    }
    holders: dict[str, set[str]] = {}  # new parameter name -> the modules holding one
    for name in parameters:
        holder, _, leaf = name.rpartition(".")
        holders.setdefault(leaf, set()).add(holder)
    for old, new in renamed.items():
        if old not in resolved and any(
            matches(spec, f"{holder}.{old}") and not _left_out(config, f"{holder}.{old}")
            for holder in holders.get(new, ())
        ):
            resolved.add(old)
    return resolved


def check_regex_modules(model: nn.Module, regex: str, converted: LoraConfig) -> None:
    """``TargetModulesError`` naming ``regex`` (the user's ``target_modules``) and the first
    module that ``converted`` (the list lorakit resolved it to) selects and no LoRA layer can
    wrap, e.g. a whole MoE block: the layer's own error would name a list entry the user never
    wrote. PEFT refuses such a module too ("Target module ... is not supported")."""
    for name in find_targets(model, converted):
        module = model.get_submodule(name)
        try:
            layer_class_for(module, name)
        except UnsupportedModuleError:  # (others, e.g. an unknown quantized format: as they are)
            raise TargetModulesError(_regex_message(model, regex, converted, name)) from None


def _regex_message(model: nn.Module, regex: str, converted: LoraConfig, name: str) -> str:
    """The message for ``regex``, whose resolved list ``converted`` selects module ``name``,
    which lorakit cannot adapt."""
    kind = type(model.get_submodule(name)).__name__
    message = (
        f"target_modules={regex!r} selects {name!r}, a {kind}, which lorakit cannot adapt "
        f"(PEFT refuses it too). On this {type(model).__name__} (fused MoE experts) a regex "
        f"stands for the last name parts of the modules it matches, "
        f"{converted.target_modules}"
    )
    if converted.target_parameters:
        message += (
            ", the transformers-4 expert and router names it matches becoming target_parameters "
            f"{converted.target_parameters}"
        )
    return message + (
        ". Narrow the regex to linear layers (e.g. r'.*\\.(q_proj|v_proj)'), add such modules "
        "to exclude_modules, or name the expert parameters in target_parameters."
    )


def _original_parameter_names(model: nn.Module) -> Iterable[str]:
    """The names of the parameters of the ORIGINAL model (a LoRA layer's base parameters under
    the name of the module it stands for; adapter tensors left out)."""
    for owner, module in model_modules(model):
        for name, _ in module.named_parameters(recurse=False):
            yield f"{owner}.{name}" if owner else name


def _left_out_everywhere(config: LoraConfig, parameters: list[str], old: str, new: str) -> bool:
    """Whether ``exclude_modules`` / ``modules_to_save`` (``_left_out``) take every parameter
    ``<p>.<new>`` among ``parameters`` that the transformers-4 name ``old`` becomes: through
    the module ``<p>.<old>`` it stood for (Mixtral's router ``...mlp.gate``, its
    ``...mlp.experts.w1``), the module holding the parameter, or the parameter's own path (what
    ``find_parameter_targets`` would refuse as left out). False where the model has no such
    parameter (the entry is then left to the usual error) or some parameter is kept."""
    found = [name for name in parameters if name.endswith(f".{new}")]
    return bool(found) and all(
        any(_left_out(config, name) for name in (path[: -len(new)] + old, owner, path))
        for path in found
        for owner in [path.rpartition(".")[0]]
    )


def _left_out(config: LoraConfig, name: str) -> bool:
    """PEFT's exclusions when it resolves a regex: ``exclude_modules``, and a name with an entry
    of ``modules_to_save`` as a whole dotted part."""
    if config.exclude_modules is not None and matches(config.exclude_modules, name):
        return True
    return any(
        re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", name)
        for entry in config.modules_to_save or []
    )
