"""``LoraConfig``'s validation: ``validate(config)`` raises ``ValueError`` naming the first
field that is not valid, its value and what it should be (``LoraConfig.__post_init__`` calls
it, so an invalid config never exists). Regexes are checked for run time too
(``lorakit.patterns``: configs are untrusted input).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lorakit.init_methods import EvaConfig, LoftQConfig, changes_base, not_implemented_message
from lorakit.patterns import check_pattern, check_pattern_set, shown

if TYPE_CHECKING:
    from lorakit.config import LoraConfig

__all__ = ["ALL_LINEAR", "is_finite_number", "is_positive_number", "validate"]

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "eva")
# Inits that only draw the starting factors and that a file's config does not keep (its
# tensors replace them: ``io.config_json`` reads them as True), besides ``INIT_MODES``.
DRAWN_INITS = ("orthogonal",)
_EXPECTED_INITS = (
    '"gaussian", "orthogonal", "pissa", "pissa_niter_K" (K an integer), "olora", "loftq" or "eva"'
)


def validate(config: LoraConfig) -> None:
    """Raise ``ValueError`` naming the first field that is not valid, and why."""
    _check_kinds(config)  # first: the patterns read below must be dicts
    _check_numbers(config)
    _check_init(config)
    for name in ("target_modules", "exclude_modules"):
        _check_name_spec(name, getattr(config, name))
    _check_token_indices(config.trainable_token_indices)
    _check_target_parameters(config)
    _check_layer_replication(config)
    _check_layer_selection(config)


def _check_numbers(config: LoraConfig) -> None:
    """r, lora_alpha, lora_dropout, and the per-module ranks and alphas."""
    _check(_is_positive_int(config.r), "r", config.r, "a positive integer")
    _check(is_positive_number(config.lora_alpha), "lora_alpha", config.lora_alpha, POSITIVE)
    _check(
        is_finite_number(config.lora_dropout) and 0.0 <= config.lora_dropout < 1.0,
        "lora_dropout",
        config.lora_dropout,
        "a probability in [0, 1)",
    )
    for key, rank in config.rank_pattern.items():
        _check(_is_positive_int(rank), f"rank_pattern[{key!r}]", rank, "a positive integer")
    for key, alpha in config.alpha_pattern.items():
        _check(is_positive_number(alpha), f"alpha_pattern[{key!r}]", alpha, POSITIVE)
    for name in ("rank_pattern", "alpha_pattern"):
        check_pattern_set(f"LoraConfig.{name}", list(getattr(config, name)))


def _check_kinds(config: LoraConfig) -> None:
    """The fields that take one of a few values or types."""
    _check(
        config.loftq_config is None or isinstance(config.loftq_config, LoftQConfig),
        "loftq_config",
        config.loftq_config,
        "None or a lorakit.LoftQConfig",
    )
    _check(
        config.eva_config is None or isinstance(config.eva_config, EvaConfig),
        "eva_config",
        config.eva_config,
        "None or a lorakit.EvaConfig",
    )
    _check(config.bias in BIAS_MODES, "bias", config.bias, f"one of {BIAS_MODES}")
    for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        _check(
            isinstance(getattr(config, flag), bool), flag, getattr(config, flag), "True or False"
        )
    from lorakit.config import TaskType  # (config.py imports this module)

    tasks = [task.value for task in TaskType]
    _check(
        config.task_type is None or config.task_type in tasks,
        "task_type",
        config.task_type,
        f"None or one of {tasks}",
    )
    _check(
        config.modules_to_save is None
        or (
            isinstance(config.modules_to_save, list)
            and all(isinstance(n, str) and n for n in config.modules_to_save)
        ),
        "modules_to_save",
        config.modules_to_save,
        'None or a list of module names (e.g. ["classifier"], not "classifier")',
    )
    _check(
        config.base_model_name_or_path is None or isinstance(config.base_model_name_or_path, str),
        "base_model_name_or_path",
        config.base_model_name_or_path,
        "None or a string",
    )
    for pattern in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, pattern)
        _check(isinstance(value, dict), pattern, value, "a dict {regex: value}")


def _check_init(config: LoraConfig) -> None:
    """init_lora_weights, and what it cannot go with (DoRA; a bias on B)."""
    init = config.init_lora_weights
    if not isinstance(init, (bool, str)) and isinstance(init, (int, float)):
        raise ValueError(
            f"LoraConfig.init_lora_weights={init!r} is invalid: expected the bool True or False "
            f"(not the number {init!r}: PEFT takes 0 as False and fails on 1 with an "
            f"AttributeError), {_EXPECTED_INITS}."
        )
    peft_only = not_implemented_message(init)  # MiCA, CorDA, LoRA-GA: what to do instead
    if peft_only is not None:
        raise ValueError(peft_only)
    _check(
        isinstance(init, bool)
        or (isinstance(init, str) and (init in INIT_MODES or init in DRAWN_INITS))
        or changes_base(init),
        "init_lora_weights",
        init,
        f"True, False, {_EXPECTED_INITS}",
    )
    if config.use_dora and changes_base(config.init_lora_weights):
        raise ValueError(
            f"LoraConfig.init_lora_weights={config.init_lora_weights!r} with use_dora=True is "
            "not implemented in lorakit; use one of them."
        )
    _check(
        not config.lora_bias or (not config.use_dora and config.init_lora_weights in (True, False)),
        "lora_bias",
        config.lora_bias,
        "False with use_dora=True or an init_lora_weights other than True/False (PEFT's rule)",
    )


def _check_layer_replication(config: LoraConfig) -> None:
    ranges = config.layer_replication  # (pairs made lists by __post_init__)
    if ranges is not None and changes_base(config.init_lora_weights):
        raise ValueError(
            f"LoraConfig.layer_replication={ranges!r} cannot be used with "
            f"init_lora_weights={config.init_lora_weights!r}: the copies of a layer share its "
            "base weights, which this init rewrites in place once per copy (the output would "
            "change). Inject with init_lora_weights=True (or without layer_replication)."
        )
    _check(
        ranges is None
        or (
            isinstance(ranges, list)
            and bool(ranges)
            and all(
                isinstance(pair, list)
                and len(pair) == 2
                and all(_is_int(i) for i in pair)
                and 0 <= pair[0] < pair[1]
                for pair in ranges
            )
        ),
        "layer_replication",
        ranges,
        "None or a non-empty list of [start, end) layer ranges with 0 <= start < end",
    )


def _check_target_parameters(config: LoraConfig) -> None:
    names = config.target_parameters
    if names is None:
        return
    _check(
        isinstance(names, list) and all(isinstance(n, str) and n for n in names),
        "target_parameters",
        names,
        'None or a list of parameter names (e.g. ["experts.gate_up_proj"])',
    )
    clashes = {
        "lora_dropout": config.lora_dropout != 0,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "fan_in_fan_out": config.fan_in_fan_out,
        "init_lora_weights": not any(
            config.init_lora_weights is m or config.init_lora_weights == m
            for m in (True, False, "gaussian")
        ),
    }
    for field_name, clash in clashes.items():
        if clash:
            raise ValueError(
                f"LoraConfig.{field_name}={getattr(config, field_name)!r} cannot be used with "
                f"target_parameters={names!r} (as in PEFT: a parameter's update is folded "
                "into the weight); use the default value "
                f"({field_name}={type(config).__dataclass_fields__[field_name].default!r}"
                + ", with lorakit train: --dropout 0" * (field_name == "lora_dropout")
                + "), or target modules instead."
            )


def _check_layer_selection(config: LoraConfig) -> None:
    if config.layers_to_transform is None:
        if config.layers_pattern:
            raise ValueError(
                f"layers_pattern={config.layers_pattern!r} is set but layers_to_transform is "
                "None; set layers_to_transform to the layer indices to adapt, or drop "
                "layers_pattern."
            )
        return
    patterns = config.layers_pattern
    if patterns is not None:
        _check(
            isinstance(patterns, (str, list)),
            "layers_pattern",
            patterns,
            "None, a regex string or a list of them",
        )
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            _check_regex("layers_pattern", pattern)
    indices = (
        [config.layers_to_transform]
        if isinstance(config.layers_to_transform, int)
        else config.layers_to_transform
    )
    _check(
        all(isinstance(i, int) and i >= 0 for i in indices),
        "layers_to_transform",
        config.layers_to_transform,
        "a non-negative int or a list of them",
    )
    if isinstance(config.target_modules, str):
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform!r} cannot be combined with a "
            f"regex target_modules={config.target_modules!r}; pass target_modules as a list of "
            "module names, or put the layer indices into the regex."
        )


POSITIVE = "a positive finite number"


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_number(value: Any) -> bool:
    return is_finite_number(value) and value > 0


def _check(ok: bool, field_name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"LoraConfig.{field_name}={value!r} is invalid: expected {expected}.")


def _check_token_indices(value: Any) -> None:
    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(_is_int(i) and i >= 0 for i in v)

    _check(
        value is None
        or ids(value)
        or (
            isinstance(value, dict)
            and bool(value)
            and all(isinstance(k, str) and k and ids(v) for k, v in value.items())
        ),
        "trainable_token_indices",
        value,
        "None, a non-empty list of token ids, or {module name: list of token ids}",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_regex(field_name: str, pattern: Any) -> None:
    """``field_name``: e.g. "rank_pattern key"; the error shows it with the pattern."""
    what = f"LoraConfig.{field_name} {shown(pattern)}"
    if not isinstance(pattern, str):
        raise ValueError(f"{what} is invalid: expected a regex string.")
    check_pattern(what, pattern, 2 if field_name.startswith("layers_pattern") else 0)


def _check_name_spec(field_name: str, spec: Any) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        if spec != ALL_LINEAR:
            _check_regex(field_name, spec)
        return
    if not isinstance(spec, list) or not all(isinstance(s, str) and s for s in spec):
        raise ValueError(
            f"LoraConfig.{field_name}={spec!r} is invalid: expected a regex string, "
            f'"{ALL_LINEAR}", or a list of non-empty module names.'
        )
