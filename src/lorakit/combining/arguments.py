"""The arguments of ``combine`` (and of ``lorakit combine`` and the server's mixtures): the
methods, which options each method takes, and the checks that refuse the rest before any
adapter is read (``check_arguments``, whose ``ArgumentError`` names the argument refused)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from lorakit.combining.methods import SIGN_METHODS
from lorakit.errors import UserError

__all__ = [
    "METHODS",
    "OPTION_METHODS",
    "PRUNING",
    "ArgumentError",
    "check_arguments",
    "rank_for_cat",
    "unused_option",
]

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "density": PRUNING,
    "majority_sign_method": ("ties", "dare_ties"),
    "seed": ("dare_linear", "dare_ties"),
}
"""The methods each option acts on; given to any other method it is refused (it would be
ignored). One rule for ``combine``, ``lorakit combine`` and the server's mixtures."""


class ArgumentError(UserError):
    """``check_arguments``' refusal. ``argument``: the argument refused (``weights``,
    ``method``, ``rank``, ``density``, ``majority_sign_method``, ``seed``), for a caller that
    points at it (the server's ``param``); ``reason``: the message without ``combine: ``."""

    def __init__(self, reason: str, argument: str) -> None:
        super().__init__(f"combine: {reason}")
        self.reason = reason
        self.argument = argument


def rank_for_cat(name: str) -> str:
    """The refusal of a rank given to ``cat`` (whose rank is the sum of the inputs' ranks),
    ``name`` naming it as the caller's user gave it (``rank=4``, ``--rank``)."""
    cutting = ", ".join(method for method in METHODS if method != "cat")
    return (
        f"{name} is for the methods that cut the result to a rank ({cutting}), not cat (cat's "
        "rank is the sum of the adapters' ranks): leave it out, or choose one of those methods"
    )


def unused_option(
    method: str, options: Mapping[str, object], shown: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """``(option, message)`` for the first of ``options`` (``OPTION_METHODS`` name -> value,
    None meaning not given) that ``method`` would ignore, else None. ``shown``: the name to
    print for an option (a command-line flag, a request field), default the option's own."""
    for option, value in options.items():
        methods = OPTION_METHODS[option]
        if value is not None and method not in methods:
            name = (shown or {}).get(option, option)
            return option, (
                f"{name} is for {', '.join(methods)}, not {method}; leave it out or choose one "
                "of those methods"
            )
    return None


def _is_integer(value: object) -> bool:
    """An integral number (``int``, ``numpy.int64``, ...), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_arguments(
    count, weights, method, rank, density, majority_sign_method, seed
) -> list[float]:
    """The weights as floats (1.0 each when None), after refusing with an ``ArgumentError``
    naming it: no adapter, a weight count that differs from ``count`` or a weight that is not
    finite, an unknown method, a rank given to ``cat`` or not a positive integer, an option the
    method ignores (``unused_option``), a density outside (0, 1] (or none) for the pruning
    methods, an unknown sign method, a seed that is not an integer."""
    if count == 0:
        raise ArgumentError("give at least one adapter", "adapters")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ArgumentError(
            f"{count} adapters but {len(weights)} weights; give one each", "weights"
        )
    if not all(math.isfinite(weight) for weight in weights):  # (float64: 1e39 is finite)
        raise ArgumentError(f"weights must be finite numbers, got {weights}", "weights")
    if method not in METHODS:
        raise ArgumentError(
            f"unknown method {method!r}; choose one of {', '.join(METHODS)}", "method"
        )
    if rank is not None and method == "cat":
        raise ArgumentError(rank_for_cat(f"rank={rank!r}"), "rank")
    if rank is not None and (not _is_integer(rank) or rank < 1):
        raise ArgumentError(f"rank={rank!r} must be a positive integer", "rank")
    given = {"density": density, "majority_sign_method": majority_sign_method, "seed": seed}
    unused = unused_option(method, given)
    if unused is not None:
        raise ArgumentError(unused[1], unused[0])
    if method in PRUNING and density is None:
        raise ArgumentError(f"method {method} needs density in (0, 1]; none was given", "density")
    if method in PRUNING and not 0.0 < density <= 1.0:
        raise ArgumentError(f"method {method} needs density in (0, 1], got {density}", "density")
    if majority_sign_method is not None and majority_sign_method not in SIGN_METHODS:
        raise ArgumentError(
            f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}",
            "majority_sign_method",
        )
    if seed is not None and not _is_integer(seed):
        raise ArgumentError(f"seed must be an integer, got {seed!r}", "seed")
    return weights
