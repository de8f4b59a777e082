"""The value checks ``LoraConfig``'s validation is made of (``config_checks``,
``config_layer_checks``): ``check`` raises the ``ValueError`` that names the field, its value
and what it should be; ``check_regex`` checks a pattern for run time too (``lorakit.patterns``)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from lorakit.patterns import check_pattern, shown

__all__ = [
    "FINITE",
    "check",
    "check_regex",
    "is_finite_number",
    "is_int",
    "is_positive_int",
    "is_positive_number",
    "is_token_id_list",
    "normalised_token_ids",
]


FINITE = "a finite number"


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_number(value: Any) -> bool:
    return is_finite_number(value) and value > 0


def check(ok: bool, field_name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"LoraConfig.{field_name}={value!r} is invalid: expected {expected}.")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_regex(field_name: str, pattern: Any) -> None:
    """``field_name``: e.g. "rank_pattern key"; the error shows it with the pattern."""
    what = f"LoraConfig.{field_name} {shown(pattern)}"
    if not isinstance(pattern, str):
        raise ValueError(f"{what} is invalid: expected a regex string.")
    check_pattern(what, pattern, 2 if field_name.startswith("layers_pattern") else 0)


def normalised_token_ids(value: Any) -> Any:
    """``trainable_token_indices`` as lorakit keeps and saves it: each list of ids (a list or
    tuple, PEFT takes both) a list of Python ints, numpy integers converted (``numbers.Integral``;
    bools are left as they are, for the check to refuse); in the dict form each value so.
    Anything else is returned unchanged (``config_checks`` refuses it, naming it)."""
    if isinstance(value, dict):
        return {key: _int_list(ids) for key, ids in value.items()}
    return _int_list(value)


def _int_list(ids: Any) -> Any:
    if not isinstance(ids, (list, tuple)):
        return ids
    return [
        int(i) if isinstance(i, numbers.Integral) and not isinstance(i, bool) else i for i in ids
    ]


def is_token_id_list(ids: Any) -> bool:
    """A non-empty list of Python ints >= 0 (not bools)."""
    return isinstance(ids, list) and bool(ids) and all(is_int(i) and i >= 0 for i in ids)
