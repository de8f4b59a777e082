"""Argument checks of ``lorakit.analysis.intrinsic``: one clear error per bad argument, naming it.

The wrapper's (``IntrinsicDimension``, ``Fastfood``): d and D positive integers with d <= D, an
integer seed, the reparametrised names as a list, float32 / float64 tensors and tables. d90's
(``d90``, ``d90_of_gain``, ``bootstrap_d90``): a threshold in (0, 1], finite baseline scores
(lists or 1-D arrays, one per seed), the bootstrap's seed an int or None (fresh randomness), and
the dimensions d as ints: integral numbers (300.0, numpy's) and int strings (the keys a results
JSON gives back) converted.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence, Set

import torch
from torch import nn

__all__ = [
    "bootstrap_scores",
    "chosen_parameters",
    "dimension_keys",
    "finite_score",
    "fraction_threshold",
    "integer_seed",
    "optional_seed",
    "positive_int",
    "refuse_above_total",
    "refuse_narrow",
    "refuse_narrow_tables",
    "resample_count",
    "seed_scores",
]

TORCH_SEED_RANGE = (-(2**63), 2**64)
"""``torch.Generator.manual_seed`` takes a seed in ``[-2^63, 2^64)``."""


def _is_int(value) -> bool:
    """An integer that is not a bool (Python counts True as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value, what: str) -> int:
    """``value`` as an int; ``TypeError`` for a non-integer (a float such as 1e3, or a bool, which
    Python counts as an int), ``ValueError`` below 1. ``what`` names it in the message."""
    if not _is_int(value):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def integer_seed(value, *, torch_generator: bool = False) -> int:
    """``seed`` as an int: ``TypeError`` for None, a float or a bool; with ``torch_generator``,
    ``ValueError`` outside ``TORCH_SEED_RANGE``."""
    if not _is_int(value):
        raise TypeError(
            f"seed must be an int (it fixes the random draws, so that a run can be repeated), "
            f"got {value!r}"
        )
    low, high = TORCH_SEED_RANGE
    if torch_generator and not low <= value < high:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {value!r}")
    return int(value)


def optional_seed(value) -> int | None:
    """``bootstrap_d90``'s seed: None (``random.Random(None)``, fresh randomness from the OS, a
    different interval at each call) or an int as in ``integer_seed``."""
    return None if value is None else integer_seed(value)


def chosen_parameters(
    named: Mapping[str, nn.Parameter], parameter_names: Sequence[str] | None
) -> list[str]:
    """The names to reparametrise: ``parameter_names``, or every parameter that requires grad.

    ``TypeError`` for a bare string (iterating it would give its characters); ``ValueError`` for
    an unknown or repeated name, or when none is chosen (D would be 0).
    """
    if parameter_names is None:
        chosen = [name for name, p in named.items() if p.requires_grad]
        if not chosen:
            raise ValueError(
                "no parameter to reparametrise: none of the model's parameters requires grad "
                "(was the model already wrapped in an IntrinsicDimension, which freezes them?); "
                "pass parameter_names"
            )
        return chosen
    if isinstance(parameter_names, (str, bytes)):
        raise TypeError(
            f"parameter_names must be a list of parameter names, got the string "
            f"{parameter_names!r}; pass [{parameter_names!r}] to reparametrise that one parameter"
        )
    names = list(parameter_names)
    unknown = [name for name in names if name not in named]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown[:5]}; see model.named_parameters()")
    if not names:
        raise ValueError(
            "no parameter to reparametrise: parameter_names is empty; name at least one of "
            "model.named_parameters()"
        )
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(
            f"parameter name(s) {repeated[:5]} given more than once in parameter_names: each "
            "copy would add its size to D and only one copy's step would be applied; name each "
            "parameter once"
        )
    return names


def refuse_narrow(named: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    """``TypeError`` naming the first of ``names`` whose θ_0 is not float32 / float64.

    SAID's steps (about |θ_d| / sqrt(D) per number) are below bfloat16's / float16's resolution
    of θ_0, so ``θ_0 + step`` in that dtype would round them off (a bfloat16 Linear(256, 256)
    lost 16% of a step from θ_d of std 0.01, measured as ||applied - step|| / ||step||).
    """
    narrow = [n for n in names if named[n].dtype not in (torch.float32, torch.float64)]
    if narrow:
        raise TypeError(
            f"parameter {narrow[0]!r} is {named[narrow[0]].dtype}: SAID's steps (about "
            "|θ_d| / sqrt(D) per number) are below its resolution of θ_0 and would be "
            "rounded away; keep the model in float32 (or float64), also after wrapping it"
        )


def refuse_narrow_tables(dtype: torch.dtype) -> None:
    """``TypeError`` when ``Fastfood``'s tables were cast below float32 (the transform's
    intermediate values, about L |θ_d|, overflow float16)."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"the Fastfood tables were cast to {dtype}, where the transform overflows; keep "
            "this module, and the model it reparametrises, in float32 or float64"
        )


def refuse_above_total(dimension: int, total: int) -> None:
    """``ValueError`` when d > D: P (D x d) would be rank-deficient."""
    if dimension > total:
        raise ValueError(
            f"d={dimension} is larger than D={total}, the number of reparametrised "
            "numbers: P (D x d) would be rank-deficient and d would overstate the trainable "
            "dimension; choose d <= D (or reparametrise more parameters)"
        )


def _as_dimension(key, what: str) -> int:
    """A key of ``what`` as the int d: an int, an integral real number (300.0, ``np.float64``)
    or a string of an int (as JSON gives keys back); ``TypeError`` for anything else (a bool,
    300.5, NaN, ``'1e3'``)."""
    if _is_int(key):
        return int(key)
    if isinstance(key, numbers.Real) and not isinstance(key, bool):
        if math.isfinite(key) and float(key).is_integer():
            return int(key)
    elif isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            pass
    raise TypeError(
        f"the keys of {what} must be the dimensions d as ints (a whole number such as 300 or "
        f"300.0, or a string of an int, as a JSON file gives them back), got {key!r}"
    )


def dimension_keys(scores: Mapping, what: str = "scores") -> dict:
    """``scores`` with every key as the int d (``'300'`` -> 300): ``min`` over str keys would be
    alphabetical (``'1000' < '300'``). ``ValueError`` when two keys name the same d."""
    out: dict = {}
    for key, value in scores.items():
        dimension = _as_dimension(key, what)
        if dimension in out:
            raise ValueError(f"d={dimension} appears twice in the keys of {what}; keep one of them")
        out[dimension] = value
    return out


def _as_float(value, what: str, expected: str) -> float:
    """``value`` as a float (a Python or numpy number, a 0-d tensor); ``TypeError`` otherwise."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{what} must be {expected}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be {expected}, got {value!r}") from None


def fraction_threshold(threshold) -> float:
    """``threshold`` as a float in (0, 1]: 90 (a percentage) would never be reached, and 0 or
    less would be reached by every d."""
    value = _as_float(threshold, "threshold", "a fraction in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"threshold must be a fraction in (0, 1] (0.9 for 90%), got {threshold!r}")
    return value


def finite_score(score, what: str) -> float:
    """``score`` as a finite float: a NaN or infinite baseline makes every comparison fail."""
    value = _as_float(score, what, "a finite number")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {score!r}")
    return value


def _score_list(values, what: str) -> list:
    """``values`` as a list, one score per seed: ``TypeError`` for a single number, a string, a
    mapping, a set (unordered, and equal scores of two seeds would count once) or an array that
    is not 1-D; ``ValueError`` when empty."""
    not_a_list = isinstance(values, (str, bytes, Mapping, Set)) or not (
        hasattr(values, "__len__") and hasattr(values, "__iter__")
    )
    if not_a_list or getattr(values, "ndim", 1) != 1:
        raise TypeError(
            f"{what} must be a list of scores, one per seed (or a 1-D array), got {values!r}"
        )
    if len(values) == 0:
        raise ValueError(
            f"bootstrap_d90 needs at least one score per dimension and baseline: {what} is empty"
        )
    return list(values)


def seed_scores(values, what: str) -> list[float]:
    """One finite float score per seed from a list, tuple or 1-D array (``_score_list``);
    ``ValueError`` for a NaN / infinite score (``what[i]`` named)."""
    values = _score_list(values, what)
    return [finite_score(value, f"{what}[{index}]") for index, value in enumerate(values)]


def bootstrap_scores(runs: Mapping, full, frozen) -> tuple[dict, list[float], list[float]]:
    """``bootstrap_d90``'s scores checked: ``runs`` keyed by int d, a non-empty list (or 1-D
    array) per d, and one finite score per seed of each baseline."""
    if not runs:
        raise ValueError("bootstrap_d90 needs at least one score per dimension and baseline")
    runs = {d: _score_list(values, f"runs[{d!r}]") for d, values in runs.items()}
    return dimension_keys(runs, "runs"), seed_scores(full, "full"), seed_scores(frozen, "frozen")


def resample_count(resamples) -> int:
    """``resamples`` as an int >= 1."""
    if not _is_int(resamples):
        raise TypeError(f"resamples must be an integer >= 1, got {resamples!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    return int(resamples)
