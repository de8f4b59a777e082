"""PEFT's conversion of a config's targets for the MoE architectures transformers 5 fused.

transformers 5 fused the experts of some mixture-of-experts families into 3-D parameters
(``mlp.experts.gate_up_proj`` (E, 2 f, d), ``mlp.experts.down_proj`` (E, d, f)) and turned the
router into a module holding a bare ``gate.weight``: the linear layers that transformers 4
had there (Mixtral's ``w1`` / ``w3`` / ``w2`` and ``gate``, Qwen2-MoE's ``gate_proj`` /
``up_proj`` / ``down_proj`` and ``gate``) are gone. PEFT (with transformers >= 5) rewrites
a LoRA config for such a model when it injects it (``get_peft_model`` and loading), and lorakit
applies the same rule, PEFT 0.22's (``convert_moe_config``; a file's writer's release:
``lorakit.moe_entries``), so that both adapt the same tensors:

- The family: the model's ``config.model_type`` is ``"mixtral"`` or one that transformers'
  ``conversion_mapping._MODEL_TO_CONVERSION_PATTERN`` maps to ``"mixtral"`` or ``"qwen2_moe"``
  (e.g. ``minimax``, ``qwen3_moe``, ``olmoe``, ``deepseek_v3``), or ``"qwen2_moe"`` itself
  (from PEFT 0.22; 0.21 looked the type up in that table, where it is only a target).
- A string ``target_modules`` is first resolved to leaf names: ``"all-linear"`` to the last
  name parts of the linear layers it selects plus every transformers-4 name of the family (the
  experts and the router were linear there) except one whose every place (``<experts
  module>.<old name>``, the router's ``<block>.gate``) ``exclude_modules`` / ``modules_to_save``
  leave out, as for a regex (PEFT, 0.21 and 0.22 alike, adds them all and adapts an excluded
  router or experts anyway: a deliberate difference, docs/migrating-from-peft.md);
  a regex to the last name parts of the modules and
  parameters it matches in full (outside ``exclude_modules`` / ``modules_to_save``), plus each
  transformers-4 name whose reconstructed path (``<experts module>.<old name>``) it matches.
  A regex is thereby widened to every module with such a leaf name (PEFT's rule). A
  parameter's last name part is kept only where it can stand as a list entry: a module's last
  name part or a transformers-4 name. PEFT keeps the others too (``weight`` from
  ``...q_proj.weight``, ``bias``, Mixtral's ``gate_up_proj``), entries that name no module and
  adapt nothing, so both adapt the same tensors; lorakit leaves them out of the config it
  records, which lists only real targets (every entry of it names a module).
- A regex is one pattern: the list it becomes is lorakit's, so its errors name the regex. One
  that selects a module lorakit cannot adapt (e.g. OLMoE's ``".*mlp.*"``, which matches the
  MoE block itself) is refused with ``TargetModulesError`` naming the regex and the module (PEFT
  refuses it as well: "Target module ... is not supported"); one that matches nothing is left
  as it is, for the usual error.
- Each ``target_modules`` entry equal to a transformers-4 name or ending in ``"." + name``
  moves to ``target_parameters``, that name replaced by its new one (``w1``, ``w3`` ->
  ``gate_up_proj``; ``w2`` -> ``down_proj``; ``gate`` -> ``gate.weight``;
  ``mlp.experts.w1`` -> ``mlp.experts.gate_up_proj``), unless every module it matches is an
  ``nn.Linear``: then it stays, and adds the parameter only where one has that name
  (``lorakit.moe_entries.moved_entry``); the others stay.
- ``gate_up_proj`` holds two fused projections: targeting both doubles its rank and alpha
  (``rank_pattern`` / ``alpha_pattern`` key ``.*\\.gate_up_proj``: ``2 r``, ``2 lora_alpha``,
  so the scaling ``lora_alpha / r`` per projection is unchanged), targeting only one is
  refused. Under rsLoRA the scaling is ``lora_alpha / sqrt(r)``: ``2 lora_alpha / sqrt(2 r)``
  is ``sqrt(2)`` times what each projection had in transformers 4. That is PEFT's value, kept
  (files agree with PEFT's), with a ``FusedMoeRsLoraWarning`` at ``inject``.
- The families of the ``qwen2_moe`` conversion (``qwen2_moe``, ``deepseek_v3``, ``glm4_moe``,
  ...) name the linear layers of their shared experts and dense MLPs ``gate_proj`` /
  ``up_proj`` / ``down_proj``, the transformers-4 expert names: those entries stay module
  targets and also adapt the routed experts' parameters (PEFT 0.21 moved them to the expert
  parameters only, so such layers were no target).

The converted config is what the model records and what ``save_adapter`` writes, as PEFT's
``adapter_config.json`` does; converting it again changes nothing.
"""

from __future__ import annotations

import math
import re
import warnings

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetModulesError
from lorakit.moe_entries import PEFT_022, moved_entry, rule_release
from lorakit.moe_string_targets import check_regex_modules, resolve_string_targets

__all__ = [
    "FusedMoeRsLoraWarning",
    "convert_moe_config",
    "expert_parts",
    "fused_moe_family",
    "renamed_modules",
    "transformers4_names",
]


class FusedMoeRsLoraWarning(UserWarning):
    """rsLoRA on a fused expert parameter (``gate_up_proj``, two transformers-4 projections):
    PEFT's doubled rank and alpha give it ``sqrt(2)`` times the scaling each projection had in
    transformers 4 (``2 alpha / sqrt(2 r)`` against ``alpha / sqrt(r)``). lorakit keeps PEFT's
    value and says so once per ``inject``."""


# transformers-4 module name -> the transformers-5 parameter it became, per family (PEFT's
# _MOE_TARGET_MODULE_MAPPING), in PEFT's order (the first name an entry ends with wins).
_RENAMED: dict[str, dict[str, str]] = {
    "mixtral": {
        "gate": "gate.weight",
        "w1": "gate_up_proj",
        "w3": "gate_up_proj",
        "w2": "down_proj",
    },
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
# fused parameter -> the transformers-4 names fused into it (PEFT's _MOE_FUSED_TARGETS).
_FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}

# transformers-4 module name -> the transformers-5 name, per family (transformers' own
# WeightRenaming of the checkpoint keys; PEFT applies it to an adapter file's keys too).
_RENAMED_MODULES: dict[str, dict[str, str]] = {
    "mixtral": {"block_sparse_moe": "mlp"},
    "qwen2_moe": {},
}


def expert_parts(family: str) -> dict[str, tuple[str, int]]:
    """``{transformers-4 expert module name: (the fused parameter, its place in it)}`` of
    ``family``: e.g. Mixtral's ``w1`` -> ``("gate_up_proj", 0)``, ``w3`` -> ``("gate_up_proj",
    1)``, ``w2`` -> ``("down_proj", 0)`` (the router ``gate`` is no expert: left out)."""
    parts = {}
    for old, new in _RENAMED[family].items():
        if new.endswith(".weight"):
            continue  # the router: a bare 2-D weight, renamed only
        parts[old] = (new, _FUSED[family].get(new, (old,)).index(old))
    return parts


def transformers4_names(family: str) -> dict[str, str]:
    """``{transformers-4 module name: the transformers-5 parameter it became}`` of ``family``
    (Mixtral: ``w1`` / ``w3`` -> ``gate_up_proj``, ``w2`` -> ``down_proj``, ``gate`` ->
    ``gate.weight``), the names whose ``target_modules`` entries the conversion moves."""
    return dict(_RENAMED[family])


def renamed_modules(family: str) -> dict[str, str]:
    """``{transformers-4 module name: transformers-5 name}`` of ``family`` (a whole dotted part
    of a path, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``)."""
    return dict(_RENAMED_MODULES[family])


def _conversion_patterns(release: tuple = PEFT_022) -> dict[str, str] | None:
    """transformers' ``{model type: the type whose weight conversion it uses}`` as PEFT
    ``release`` extends it (``mixtral: mixtral``, and from 0.22 ``qwen2_moe: qwen2_moe``); None
    before transformers 5, which fused nothing."""
    try:
        import transformers
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
    except ImportError:
        return None
    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    own = {"mixtral": "mixtral"} | ({"qwen2_moe": "qwen2_moe"} if release >= PEFT_022 else {})
    return {**_MODEL_TO_CONVERSION_PATTERN, **own}


def fused_moe_family(model: nn.Module, release: tuple = PEFT_022) -> str | None:
    """``"mixtral"`` or ``"qwen2_moe"``: the family whose fused experts PEFT ``release``
    converts targets for, from ``model.config.model_type``; None for any other model (or
    transformers < 5)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return fused_moe_family_of(model_type, release)


def fused_moe_family_of(model_type: object, release: tuple = PEFT_022) -> str | None:
    """``fused_moe_family`` of a model whose config's ``model_type`` is ``model_type``."""
    if not isinstance(model_type, str):
        return None
    patterns = _conversion_patterns(release)
    family = None if patterns is None else patterns.get(model_type)
    return family if family in _RENAMED else None


def convert_moe_config(
    model: nn.Module, config: LoraConfig, *, warn: bool = True, written_by: str | None = None
) -> LoraConfig:
    """``config`` as PEFT rewrites it for ``model`` (see the module docstring): ``config``
    itself when the model is of no converted family or nothing changes, else a new config.
    ``TargetModulesError`` when only one of the projections fused into ``gate_up_proj`` is
    targeted. ``warn``: a ``FusedMoeRsLoraWarning`` when rsLoRA meets a fused pair (``inject``;
    a load takes a file's scaling as it was trained, without one). ``written_by``: the
    ``peft_version`` of the file ``config`` was read from, whose release's rule applies
    (``lorakit.moe_entries.rule_release``: 0.21's below 0.22); None: PEFT 0.22's."""
    release = rule_release(written_by)
    family = fused_moe_family(model, release)
    if family is None or config.target_modules is None:
        return config
    renamed = _RENAMED[family]
    targets = config.target_modules
    if isinstance(targets, str):
        resolved = resolve_string_targets(model, config, renamed)
        if not resolved:
            return config  # matches nothing: left to the usual error
        targets = resolved
    parameters = list(config.target_parameters or [])
    kept, converted = [], {}  # converted: old name -> new name
    for entry in targets:
        old = next((o for o in renamed if entry == o or entry.endswith(f".{o}")), None)
        stays, parameter = (True, None)
        if old is not None:
            stays, parameter = moved_entry(model, config, entry, old, renamed[old], release)
        kept += [entry] if stays else []
        if parameter is not None:
            converted[old] = renamed[old]
            parameters += [parameter] if parameter not in parameters else []
    if not converted and not isinstance(config.target_modules, str):
        return config  # a list without transformers-4 names: as it is
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for fused, parts in _FUSED[family].items():
        present = sorted(set(parts) & set(converted))
        if present and len(present) < len(parts):
            missing = sorted(set(parts) - set(present))
            raise TargetModulesError(
                f"{_named(config)} {present} but not {missing}: on this "
                f"{type(model).__name__} (transformers 5) they are fused into the expert "
                f"parameter {fused!r}, which can only be adapted whole. "
                + _pair_advice(config, parts, fused)
            )
        if present:  # both halves: r and alpha doubled, the scaling lora_alpha / r kept
            key = rf".*\.{re.escape(fused)}"
            rank_pattern[key] = config.r * len(parts)
            alpha_pattern[key] = config.lora_alpha * len(parts)
            if warn and config.use_rslora:
                _warn_rslora_scaling(model, config, fused, parts)
    converted_config = config.replace(
        target_modules=sorted(set(kept)),
        target_parameters=sorted(set(parameters)) or config.target_parameters,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    if isinstance(config.target_modules, str) and not config.targets_all_linear:
        check_regex_modules(model, config.target_modules, converted_config)
    return config if converted_config == config else converted_config  # (again: no change)


def _named(config: LoraConfig) -> str:
    """How the message for a half-targeted fused pair names what the user wrote."""
    if not isinstance(config.target_modules, str):
        return "target_modules names"
    excluded = f" with exclude_modules={config.exclude_modules!r}" if config.exclude_modules else ""
    return f"target_modules={config.target_modules!r}{excluded} stands for"


def _pair_advice(config: LoraConfig, parts: tuple[str, ...], fused: str) -> str:
    """What to change when only some of ``parts`` (fused into ``fused``) are targeted."""
    if isinstance(config.target_modules, str) and config.exclude_modules:
        return (
            f"Let target_modules and exclude_modules select all of {list(parts)} or none of "
            f"them (or put {fused!r} into target_parameters)."
        )
    return f"Target all of {list(parts)} (or put {fused!r} into target_parameters)."


def _warn_rslora_scaling(
    model: nn.Module, config: LoraConfig, fused: str, parts: tuple[str, ...]
) -> None:
    """``FusedMoeRsLoraWarning``: under rsLoRA (scaling ``alpha / sqrt(r)``) the fused
    ``fused`` of P = ``len(parts)`` projections, at rank ``P r`` and alpha ``P alpha``, has
    scaling ``P alpha / sqrt(P r)`` = ``sqrt(P)`` times each projection's in transformers 4."""
    count = len(parts)
    was = config.lora_alpha / math.sqrt(config.r)
    now = config.lora_alpha * count / math.sqrt(config.r * count)
    warnings.warn(
        f"use_rslora=True on this {type(model).__name__} (fused MoE experts, transformers 5): "
        f"the projections {list(parts)} are one expert parameter {fused!r} here, adapted at "
        f"rank {config.r * count} with lora_alpha {config.lora_alpha * count} as PEFT converts "
        f"them, so its rsLoRA scaling lora_alpha / sqrt(r) is {now:.4g}, sqrt({count}) = "
        f"{math.sqrt(count):.4g} times the {was:.4g} each projection had as a transformers-4 "
        "module. lorakit keeps PEFT's value, so saved files load the same in PEFT; without "
        "rsLoRA (use_rslora=False) the scaling lora_alpha / r is each projection's "
        "transformers-4 one.",
        FusedMoeRsLoraWarning,
        stacklevel=5,  # (here, convert_moe_config, inject's body, inject: its caller)
    )
