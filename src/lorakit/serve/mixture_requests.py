"""The ``merged_adapters`` field of a request body, checked into a ``Mixture``
(``lorakit.serve.mixtures`` serves it), and a mixture's inputs checked from their headers.

``parse_mixture`` checks types, names each adapter at most once (1 to ``MAX_IDS`` of them),
maps LoRAX's ``linear`` to lorakit's ``cat`` (the exact weighted sum of the updates), takes
``null`` for an entry not given (its default), and refuses what ``combine`` would refuse in
its arguments (``combining.arguments.check_arguments``: an option the method would ignore,
``rank`` for ``cat`` / ``linear``, a rank below 1, a density outside (0, 1], an unknown sign
method), each a 400 naming the entry (``param``: ``merged_adapters.<entry>``; the object for
a density left out).

``check_inputs`` refuses, from the inputs' safetensors headers (no tensor data read), before
combining: an input the bank cannot serve in any mixture (a LoRA on an embedding layer), naming
that input (``merged_adapters.ids``), and a result over the bank's ``max_rank``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from lorakit.combining import METHODS, unused_option
from lorakit.combining.arguments import ArgumentError, check_arguments
from lorakit.io.keys import lora_key_pairs, parse_lora_key
from lorakit.io.read import AdapterHeader
from lorakit.serve.protocol import APIError, float_value

__all__ = ["FIELD", "MAX_IDS", "Mixture", "bad_mixture", "check_inputs", "parse_mixture"]

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
    """The ``merged_adapters`` field as a ``Mixture``; a 400 naming the bad entry otherwise:
    each entry read and type-checked (``_read_mixture``), then the options checked together, as
    ``combine`` checks its arguments (``_check_mixture``)."""
    mixture = _read_mixture(value)
    _check_mixture(mixture, value)
    return mixture


def _read_mixture(value: object) -> Mixture:
    """Each entry of the field read, in order, with its type checked (null: not given, the
    default): no unknown entry, ``ids``, ``weights``, ``merge_strategy``, then the options."""
    if not isinstance(value, dict):
        raise bad_mixture(f"'{FIELD}' must be an object with 'ids' and optional 'weights', ...")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise bad_mixture(
            f"'{FIELD}' has unknown entries {unknown}; known: {list(_KEYS)}", unknown[0]
        )
    ids = _ids(value.get("ids"))
    weights = _weights(value.get("weights"), len(ids))
    method = _method(value.get("merge_strategy"))
    return Mixture(ids=tuple(ids), weights=weights, method=method, **_typed_options(value))


def _weights(weights: object, count: int) -> tuple[float, ...]:
    """``merged_adapters.weights``: one finite number per adapter (null: 1.0 each)."""
    weights = [1.0] * count if weights is None else weights  # (null: not given)
    if not isinstance(weights, list) or not all(_number(w) for w in weights):
        raise bad_mixture(
            f"'{FIELD}.weights' must be a list of numbers, got {weights!r}", "weights"
        )
    weights = [float_value(w, f"{FIELD}.weights") for w in weights]
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise bad_mixture(
            f"'{FIELD}.weights': give one finite number per adapter ({count}), got {weights}",
            "weights",
        )
    return tuple(weights)


def _method(strategy: object) -> str:
    """``merged_adapters.merge_strategy`` as a ``combine`` method (null: ``cat``; LoRAX's
    ``linear`` is ``cat``)."""
    strategy = "cat" if strategy is None else strategy  # (null: not given)
    method = _ALIASES.get(strategy, strategy) if isinstance(strategy, str) else strategy
    if method not in METHODS:
        raise bad_mixture(
            f"'{FIELD}.merge_strategy' {_shown(strategy)} is unknown; choose one "
            f"of {', '.join([*METHODS, *_ALIASES])}",
            "merge_strategy",
        )
    return method


def _typed_options(value: dict) -> dict[str, object]:
    """``rank``, ``density``, ``seed`` and ``majority_sign_method``, each None or of its type
    (an integer, a number, an integer, a string; a bool is none of them)."""
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
    return {**options, "majority_sign_method": sign}


def _check_mixture(mixture: Mixture, value: dict) -> None:
    """The options together, as ``combine`` would refuse them: ``rank`` with ``cat``, an option
    the method would ignore, then ``combining.arguments.check_arguments``' rules (an entry left
    out that the method needs: the object, ``value``, is at fault)."""
    if mixture.rank is not None and mixture.method == "cat":
        strategy = value.get("merge_strategy")
        raise _rank_for_cat("cat" if strategy is None else strategy)
    given = {
        "density": mixture.density,
        "majority_sign_method": mixture.majority_sign_method,
        "seed": mixture.seed,
    }
    unused = unused_option(mixture.method, given, {key: f"'{FIELD}.{key}'" for key in given})
    if unused is not None:
        raise bad_mixture(unused[1], unused[0])
    try:  # (combine's own checks: the same rule, the entry named)
        check_arguments(
            len(mixture.ids), list(mixture.weights), mixture.method, mixture.rank, **given
        )
    except ArgumentError as error:  # (an entry left out: the object is at fault)
        key = None if value.get(error.argument) is None else error.argument
        name = FIELD if key is None else f"{FIELD}.{key}"
        raise bad_mixture(f"'{name}': {error.reason}", key) from None


def _shown(value: object) -> str:
    """A request's value in a message: a string as Python quotes it, the rest as JSON."""
    return repr(value[:200]) if isinstance(value, str) else json.dumps(value)[:200]


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


def check_inputs(mixture: Mixture, headers: list[AdapterHeader], max_rank: int) -> None:
    """400s before combining, from the inputs' headers (``headers``, in the order of
    ``mixture.ids``): an input with a LoRA on an embedding layer (``lora_embedding_A/B``),
    which the serving bank cannot add, so no mixture of it can be served (the way out:
    combine, merge, serve the merged model); then ``_check_ranks``."""
    for adapter, header in zip(mixture.ids, headers, strict=True):
        embedded = [key for key in sorted(header.tensors) if _embedding_factor(key)]
        if embedded:
            raise bad_mixture(
                f"'{FIELD}' cannot be served: adapter {adapter!r} has a LoRA on an embedding "
                f"layer (tensor {embedded[0]!r}: lora_embedding_A/B), which the serving bank "
                "cannot add (it adds the lora_A/lora_B products of linear layers, an output "
                "layer such as lm_head included); mix adapters of linear layers only, or "
                "combine these adapters (lorakit combine), merge the result into its base model "
                "(lorakit merge) and serve the merged model instead",
                "ids",
            )
    _check_ranks(mixture, headers, max_rank)


def _embedding_factor(key: str) -> bool:
    return parse_lora_key(key) is not None and parse_lora_key(key, embeddings=False) is None


def _check_ranks(mixture: Mixture, headers: list[AdapterHeader], max_rank: int) -> None:
    """A 400 when the result's rank is over the bank's ``max_rank``: a module's sum of the
    inputs' ranks for ``cat``; the ``rank`` asked for by the other methods, except where
    ``svd``'s result (of a sum of the inputs' updates, so of rank at most their ranks' sum)
    stays within ``max_rank`` in every module."""
    if mixture.method != "cat" and (mixture.rank is None or mixture.rank <= max_rank):
        return
    module, total = _largest_summed_rank(headers)
    if mixture.method in ("cat", "svd") and total <= max_rank:
        return
    if mixture.method == "cat":
        raise bad_mixture(
            f"'{FIELD}' cannot be served: merge_strategy 'cat' (or 'linear') adds the ranks, "
            f"and {module!r} would have rank {total} > the bank's max_rank {max_rank}. Ask "
            f"for merge_strategy 'svd' with 'rank' <= {max_rank} instead, or mix fewer "
            "adapters."
        )
    raise bad_mixture(
        f"'{FIELD}.rank' {mixture.rank} is over the bank's max_rank {max_rank}: "
        f"merge_strategy {mixture.method!r} cuts the mixture to that rank, which the bank "
        f"cannot hold. Ask for 'rank' <= {max_rank}.",
        "rank",
    )


def _largest_summed_rank(headers: list[AdapterHeader]) -> tuple[str, int]:
    """The module whose inputs' ranks add up to the most, and that sum, from the headers."""
    ranks: dict[str, int] = {}
    for header in headers:
        for module, pair in lora_key_pairs(header.tensors).items():
            entry = header.tensors.get(pair.get("lora_A", ""))
            if entry is not None and entry.shape:
                ranks[module] = ranks.get(module, 0) + entry.shape[0]
    return max(ranks.items(), key=lambda item: item[1], default=("", 0))
