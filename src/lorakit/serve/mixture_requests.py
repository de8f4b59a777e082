"""The ``merged_adapters`` field of a request body, checked into a ``Mixture``
(``lorakit.serve.mixtures`` serves it).

``parse_mixture`` checks types, names each adapter at most once (1 to ``MAX_IDS`` of them),
maps LoRAX's ``linear`` to lorakit's ``cat`` (the exact weighted sum of the updates), and
refuses an option the method would ignore (``rank`` for ``cat`` / ``linear``, and
``OPTION_METHODS``), each a 400 naming the entry; ``combine`` checks the rest when the mixture
is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.combining import METHODS, unused_option
from lorakit.serve.protocol import APIError, float_value

__all__ = ["FIELD", "MAX_IDS", "Mixture", "bad_mixture", "parse_mixture"]

FIELD = "merged_adapters"  # the request body field (LoRAX's name)
_ALIASES = {"linear": "cat"}  # LoRAX's name for the weighted sum
_KEYS = ("ids", "weights", "merge_strategy", "rank", "density", "majority_sign_method", "seed")
MAX_IDS = 16  # adapters in one mixture at most (docs/serving.md)


@dataclass(frozen=True)
class Mixture:
    """What a request asked for, checked for types and options the method would ignore
    (``combine`` checks the rest); None: not given (the method's default)."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]
    method: str
    rank: int | None = None
    density: float | None = None
    majority_sign_method: str | None = None
    seed: int | None = None


def bad_mixture(message: str, key: str | None = None) -> APIError:
    """A 400 whose ``param`` is ``merged_adapters`` or the entry ``key`` of it."""
    return APIError(400, message, param=FIELD if key is None else f"{FIELD}.{key}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_mixture(value: object) -> Mixture:
    """The ``merged_adapters`` field as a ``Mixture``; a 400 naming the bad entry otherwise."""
    if not isinstance(value, dict):
        raise bad_mixture(f"'{FIELD}' must be an object with 'ids' and optional 'weights', ...")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise bad_mixture(
            f"'{FIELD}' has unknown entries {unknown}; known: {list(_KEYS)}", unknown[0]
        )
    ids = _ids(value.get("ids"))
    weights = value.get("weights", [1.0] * len(ids))
    if not isinstance(weights, list) or not all(_number(w) for w in weights):
        raise bad_mixture(
            f"'{FIELD}.weights' must be a list of numbers, got {weights!r}", "weights"
        )
    weights = [float_value(w, f"{FIELD}.weights") for w in weights]
    if len(weights) != len(ids) or not all(math.isfinite(w) for w in weights):
        raise bad_mixture(
            f"'{FIELD}.weights': give one finite number per adapter ({len(ids)}), got {weights}",
            "weights",
        )
    method = value.get("merge_strategy", "cat")
    method = _ALIASES.get(method, method) if isinstance(method, str) else method
    if method not in METHODS:
        raise bad_mixture(
            f"'{FIELD}.merge_strategy' {value.get('merge_strategy')!r} is unknown; choose one "
            f"of {', '.join([*METHODS, *_ALIASES])}",
            "merge_strategy",
        )
    options = {}
    for key, kinds, kind in (
        ("rank", int, "an integer"),
        ("density", (int, float), "a number"),
        ("seed", int, "an integer"),
    ):
        entry = value.get(key)
        if entry is not None and (not isinstance(entry, kinds) or isinstance(entry, bool)):
            raise bad_mixture(f"'{FIELD}.{key}' must be {kind}, got {entry!r}", key)
        options[key] = entry
    if options["density"] is not None:
        options["density"] = float_value(options["density"], f"{FIELD}.density")
    sign = value.get("majority_sign_method")
    if sign is not None and not isinstance(sign, str):
        raise bad_mixture(
            f"'{FIELD}.majority_sign_method' must be a string", "majority_sign_method"
        )
    if options["rank"] is not None and method == "cat":
        raise _rank_for_cat(value.get("merge_strategy", "cat"))
    given = {"density": options["density"], "majority_sign_method": sign, "seed": options["seed"]}
    unused = unused_option(method, given, {key: f"'{FIELD}.{key}'" for key in given})
    if unused is not None:
        raise bad_mixture(unused[1], unused[0])
    return Mixture(
        ids=tuple(ids),
        weights=tuple(weights),
        method=method,
        rank=options["rank"],
        density=options["density"],
        majority_sign_method=sign,
        seed=options["seed"],
    )


def _rank_for_cat(strategy: str) -> APIError:
    """The 400 on ``merged_adapters.rank`` given with ``cat`` (or its alias ``linear``; named
    as the client sent it), whose rank is the sum of the inputs' ranks, as ``combine`` refuses
    it."""
    cutting = ", ".join(method for method in METHODS if method != "cat")
    return bad_mixture(
        f"'{FIELD}.rank' is for the merge strategies that cut the mixture to a rank ({cutting}), "
        f"not {strategy!r} (whose rank is the sum of the adapters' ranks); leave it out or "
        "choose one of those strategies",
        "rank",
    )


def _ids(ids: object) -> list[str]:
    """``merged_adapters.ids``: 1 to ``MAX_IDS`` adapter names, each once; a 400 naming the
    entry otherwise."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise bad_mixture(f"'{FIELD}.ids' must be a non-empty list of adapter names", "ids")
    if len(ids) > MAX_IDS:
        raise bad_mixture(
            f"'{FIELD}.ids' names {len(ids)} adapters; a mixture takes at most {MAX_IDS}",
            "ids",
        )
    seen: set[str] = set()
    for adapter in ids:
        if adapter in seen:
            raise bad_mixture(
                f"'{FIELD}.ids' names {adapter[:200]!r} more than once; name each adapter once "
                "and give it a larger weight in 'weights' instead",
                "ids",
            )
        seen.add(adapter)
    return ids
