"""``LoraConfig``'s checks of which layers an adapter reaches, for ``config_checks.validate``:
``layer_replication``, ``target_parameters``, ``layers_to_transform`` / ``layers_pattern``, and
the refusal of a layer selection with a regex ``target_modules`` (also a model type's default
regex: ``targets``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.config_values import check, check_regex, is_int
from lorakit.init_methods import changes_base

if TYPE_CHECKING:
    from lorakit.config import LoraConfig

__all__ = [
    "check_layer_replication",
    "check_layer_selection",
    "check_target_parameters",
    "regex_with_layers_message",
]


def check_layer_replication(config: LoraConfig) -> None:
    ranges = config.layer_replication  # (pairs made lists by __post_init__)
    if ranges is not None and changes_base(config.init_lora_weights):
        raise ValueError(
            f"LoraConfig.layer_replication={ranges!r} cannot be used with "
            f"init_lora_weights={config.init_lora_weights!r}: the copies of a layer share its "
            "base weights, which this init rewrites in place once per copy (the output would "
            "change). Inject with init_lora_weights=True (or without layer_replication)."
        )
    check(
        ranges is None
        or (
            isinstance(ranges, list)
            and bool(ranges)
            and all(
                isinstance(pair, list)
                and len(pair) == 2
                and all(is_int(i) for i in pair)
                and 0 <= pair[0] < pair[1]
                for pair in ranges
            )
        ),
        "layer_replication",
        ranges,
        "None or a non-empty list of [start, end) layer ranges with 0 <= start < end",
    )


def check_target_parameters(config: LoraConfig) -> None:
    names = config.target_parameters
    if names is None:
        return
    check(
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


def check_layer_selection(config: LoraConfig) -> None:
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
        check(
            isinstance(patterns, (str, list)),
            "layers_pattern",
            patterns,
            "None, a regex string or a list of them",
        )
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            check_regex("layers_pattern", pattern)
    indices = (
        [config.layers_to_transform]
        if isinstance(config.layers_to_transform, int)
        else config.layers_to_transform
    )
    check(
        all(isinstance(i, int) and i >= 0 for i in indices),
        "layers_to_transform",
        config.layers_to_transform,
        "a non-negative int or a list of them",
    )
    if isinstance(config.target_modules, str):
        raise ValueError(regex_with_layers_message(config, config.target_modules))


def regex_with_layers_message(
    config: LoraConfig, regex: str, default_for: str | None = None
) -> str:
    """The refusal of ``layers_to_transform`` with the regex ``target_modules`` ``regex`` (PEFT
    refuses it in its config, and ignores ``layers_to_transform`` for a regex that is a model
    type's default); ``default_for``: the model that ``regex`` is the default of (e.g.
    "Gemma4ForConditionalGeneration (model type 'gemma4')"), when ``target_modules`` is unset."""
    if default_for is None:
        which = f"a regex target_modules={regex!r}"
    else:
        which = (
            f"a regex target_modules: it is unset, and lorakit's (and PEFT's) default for this "
            f"{default_for} is the regex {regex!r}"
        )
    return (
        f"layers_to_transform={config.layers_to_transform!r} cannot be combined with {which}; "
        "pass target_modules as a list of module names (a list entry matches every name that "
        "ends with it), or put the layer indices into the regex."
    )
