"""The arguments of ``combine`` (and of ``lorakit combine`` and the server's mixtures): the
methods, which options each method takes, and the checks that refuse the rest before any
adapter is read (``check_arguments``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from lorakit.combining.methods import SIGN_METHODS
from lorakit.errors import UserError

__all__ = ["METHODS", "OPTION_METHODS", "PRUNING", "check_arguments", "unused_option"]

METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "density": PRUNING,
    "majority_sign_method": ("ties", "dare_ties"),
    "seed": ("dare_linear", "dare_ties"),
}
"""The methods each option acts on; given to any other method it is refused (it would be
ignored). One rule for ``combine``, ``lorakit combine`` and the server's mixtures."""


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
    """The weights as floats (1.0 each when None), after refusing with a ``UserError`` naming
    it: no adapter, a weight count that differs from ``count`` or a weight that is not finite,
    an unknown method, a rank given to ``cat`` or not a positive integer, an option the method
    ignores (``unused_option``), a density outside (0, 1] for the pruning methods, an unknown
    sign method, a seed that is not an integer."""
    if count == 0:
        raise UserError("combine: give at least one adapter")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise UserError(f"combine: {count} adapters but {len(weights)} weights; give one each")
    if not all(math.isfinite(weight) for weight in weights):  # (float64: 1e39 is finite)
        raise UserError(f"combine: weights must be finite numbers, got {weights}")
    if method not in METHODS:
        raise UserError(f"combine: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is not None and method == "cat":
        raise UserError(
            f"combine: rank={rank!r} is for the methods that cut the result to a rank "
            f"({', '.join(m for m in METHODS if m != 'cat')}), not cat (cat's rank is the sum "
            "of the adapters' ranks): leave it out, or choose one of those methods"
        )
    if rank is not None and (not _is_integer(rank) or rank < 1):
        raise UserError(f"combine: rank={rank!r} must be a positive integer")
    given = {"density": density, "majority_sign_method": majority_sign_method, "seed": seed}
    unused = unused_option(method, given)
    if unused is not None:
        raise UserError(f"combine: {unused[1]}")
    if method in PRUNING and (density is None or not 0.0 < density <= 1.0):
        raise UserError(f"combine: method {method} needs density in (0, 1], got {density}")
    if majority_sign_method is not None and majority_sign_method not in SIGN_METHODS:
        raise UserError(
            f"combine: majority_sign_method must be one of {SIGN_METHODS}, "
            f"got {majority_sign_method!r}"
        )
    if seed is not None and not _is_integer(seed):
        raise UserError(f"combine: seed must be an integer, got {seed!r}")
    return weights
