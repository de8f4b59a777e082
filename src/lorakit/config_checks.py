"""``LoraConfig``'s validation: ``validate(config)`` raises ``ValueError`` naming the first
field that is not valid, its value and what it should be (``LoraConfig.__post_init__`` calls
it, so an invalid config never exists). Regexes are checked for run time too
(``lorakit.patterns``: configs are untrusted input). The fields' value sets live here too
(``ALL_LINEAR``, ``TaskType``; ``lorakit.config`` imports them from here).
"""

from __future__ import annotations

import enum
import warnings
from typing import TYPE_CHECKING, Any

from lorakit.config_layer_checks import (
    check_layer_replication,
    check_layer_selection,
    check_target_parameters,
)
from lorakit.config_values import (
    FINITE,
    check,
    check_regex,
    is_finite_number,
    is_positive_int,
    is_token_id_list,
    normalised_token_ids,
)
from lorakit.init_methods import EvaConfig, LoftQConfig, changes_base, not_implemented_message
from lorakit.patterns import check_pattern_set

if TYPE_CHECKING:
    from lorakit.config import LoraConfig

__all__ = ["ALL_LINEAR", "TaskType", "validate"]


class TaskType(str, enum.Enum):
    """PEFT's task types. ``SEQ_CLS``, ``TOKEN_CLS`` and ``QUESTION_ANS`` change behaviour as in
    PEFT: the task's head (``classifier`` / ``score``, or ``qa_outputs``) is trained in full and
    saved with the adapter (``targets.TASK_HEADS``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


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
    """Raise ``ValueError`` naming the first field that is not valid, and why. Token ids
    given as PEFT takes them (a tuple, numpy integers) become lists of Python ints first
    (``config_values.normalised_token_ids``), so the saved config holds plain JSON lists."""
    _check_kinds(config)  # first: the patterns read below must be dicts
    _check_numbers(config)
    _check_init(config)
    for name in ("target_modules", "exclude_modules"):
        _check_name_spec(name, getattr(config, name))
    _check_saved_entries(config.modules_to_save)
    config.trainable_token_indices = normalised_token_ids(config.trainable_token_indices)
    _check_token_indices(config.trainable_token_indices)
    check_target_parameters(config)
    check_layer_replication(config)
    check_layer_selection(config)


def _check_numbers(config: LoraConfig) -> None:
    """r, lora_alpha, lora_dropout, and the per-module ranks and alphas. An alpha may be any
    finite number, as in PEFT (which saves files with ``lora_alpha`` 0 or negative): the scaling
    ``alpha / r`` (``alpha / sqrt(r)``) is then 0 (the adapter adds nothing) or negative."""
    check(is_positive_int(config.r), "r", config.r, "a positive integer")
    check(is_finite_number(config.lora_alpha), "lora_alpha", config.lora_alpha, FINITE)
    check(
        is_finite_number(config.lora_dropout) and 0.0 <= config.lora_dropout < 1.0,
        "lora_dropout",
        config.lora_dropout,
        "a probability in [0, 1)",
    )
    for key, rank in config.rank_pattern.items():
        check(is_positive_int(rank), f"rank_pattern[{key!r}]", rank, "a positive integer")
    for key, alpha in config.alpha_pattern.items():
        check(is_finite_number(alpha), f"alpha_pattern[{key!r}]", alpha, FINITE)
    for name in ("rank_pattern", "alpha_pattern"):
        check_pattern_set(f"LoraConfig.{name}", list(getattr(config, name)))


def _check_kinds(config: LoraConfig) -> None:
    """The fields that take one of a few values or types."""
    check(
        config.loftq_config is None or isinstance(config.loftq_config, LoftQConfig),
        "loftq_config",
        config.loftq_config,
        "None or a lorakit.LoftQConfig",
    )
    check(
        config.eva_config is None or isinstance(config.eva_config, EvaConfig),
        "eva_config",
        config.eva_config,
        "None or a lorakit.EvaConfig",
    )
    check(config.bias in BIAS_MODES, "bias", config.bias, f"one of {BIAS_MODES}")
    for flag in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        check(isinstance(getattr(config, flag), bool), flag, getattr(config, flag), "True or False")
    tasks = [task.value for task in TaskType]
    check(
        config.task_type is None or config.task_type in tasks,
        "task_type",
        config.task_type,
        f"None or one of {tasks}",
    )
    check(
        config.modules_to_save is None
        or (
            isinstance(config.modules_to_save, list)
            and all(isinstance(n, str) and n for n in config.modules_to_save)
        ),
        "modules_to_save",
        config.modules_to_save,
        'None or a list of module names (e.g. ["classifier"], not "classifier")',
    )
    check(
        config.base_model_name_or_path is None or isinstance(config.base_model_name_or_path, str),
        "base_model_name_or_path",
        config.base_model_name_or_path,
        "None or a string",
    )
    for pattern in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, pattern)
        check(isinstance(value, dict), pattern, value, "a dict {regex: value}")


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
    check(
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
    check(
        not config.lora_bias or (not config.use_dora and config.init_lora_weights in (True, False)),
        "lora_bias",
        config.lora_bias,
        "False with use_dora=True or an init_lora_weights other than True/False (PEFT's rule)",
    )
    _check_pissa_alphas(config)


def _check_pissa_alphas(config: LoraConfig) -> None:
    """PiSSA's factors are ``sqrt(S_r / s)`` (``init_factors``): a scaling ``s = alpha / r``
    of 0 or below makes them infinite or NaN, and the base ``W0 - s B A`` with them (PEFT's
    too). Refused for ``lora_alpha`` and every ``alpha_pattern`` value."""
    init = config.init_lora_weights
    if not (isinstance(init, str) and init.startswith("pissa") and changes_base(init)):
        return
    alphas = {"lora_alpha": config.lora_alpha}
    alphas |= {f"alpha_pattern[{key!r}]": alpha for key, alpha in config.alpha_pattern.items()}
    for field_name, alpha in alphas.items():
        if alpha <= 0:
            raise ValueError(
                f"LoraConfig.{field_name}={alpha!r} cannot be used with init_lora_weights="
                f"{init!r}: PiSSA's factors are sqrt(S / s) with the scaling s = alpha / r "
                "(alpha / sqrt(r) with rsLoRA), which an alpha of 0 or below makes infinite or "
                "NaN (PEFT's too). Use a positive alpha, or another init."
            )


def _check_token_indices(value: Any) -> None:
    """``trainable_token_indices`` (normalised: ``config_values.normalised_token_ids``): None,
    a non-empty list of distinct ids >= 0, or ``{module name: such a list}``. A repeated id is
    refused (PEFT accepts it, but the forward reads one copy of the row and the others train
    without any effect on the outputs)."""
    expected = (
        "None, a non-empty list of int token ids (Python ints; a tuple or numpy integers are "
        "converted), or {module name: list of int token ids}"
    )
    lists = value if isinstance(value, dict) else {None: value}
    check(
        value is None
        or (
            bool(lists)
            and all(k is None or (isinstance(k, str) and k) for k in lists)
            and all(is_token_id_list(ids) for ids in lists.values())
        ),
        "trainable_token_indices",
        value,
        expected,
    )
    for key, ids in ({} if value is None else lists).items():
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            where = "" if key is None else f" for {key!r}"
            warnings.warn(  # (a warning: PEFT writes such files, and they load as in PEFT)
                f"LoraConfig.trainable_token_indices: token id(s) {repeated} given more than "
                f"once{where}; the forward reads one copy of each row and the other copies "
                "train without any effect. Give each id once.",
                UserWarning,
                stacklevel=3,
            )


def _check_saved_entries(entries: list[str] | None) -> None:
    """``modules_to_save`` entries (strings, ``_check_kinds``) are regexes too: PEFT (and
    ``targets.left_out_as_saved``) match each inside ``(^|.*\\.)<entry>($|\\..*)`` to leave
    the module it names out of the LoRA targets. Checked as the other regexes of a config
    (``patterns.check_pattern_set``, inside those two open-ended repeats)."""
    if not entries:
        return
    try:
        check_pattern_set("LoraConfig.modules_to_save", entries, "entry", enclosing_repeats=2)
    except ValueError as error:
        raise ValueError(
            f"{error} (PEFT reads each modules_to_save entry as a regex, in "
            "'(^|.*\\.)<entry>($|\\..*)', to leave the module out of the LoRA targets.)"
        ) from None


def _check_name_spec(field_name: str, spec: Any) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        if spec != ALL_LINEAR:
            check_regex(field_name, spec)
        return
    if not isinstance(spec, list) or not all(isinstance(s, str) and s for s in spec):
        raise ValueError(
            f"LoraConfig.{field_name}={spec!r} is invalid: expected a regex string, "
            f'"{ALL_LINEAR}", or a list of non-empty module names.'
        )
