"""Whether adapters may be combined at all: the same base model (``check_compatible``).

Adapters that share a module must agree on its shape and kind, and on its base weights where both
carry lorakit's base fingerprint (``lorakit.io.fingerprint``). Adapters that share no module and
adapt layers of different stacks (``model.layers`` vs ``transformer.h``) are warned about: a
Llama adapter on q_proj / v_proj and a GPT-2 one on c_attn share no module name, and the module
checks alone would see nothing; but one model's encoder and decoder adapters look the same, and
PEFT combines those.

The full base weights inputs carry (PEFT's ``save_embedding_layers``) must be equal up to the
rounding of their dtypes (``carried_base_weights``, ``same_up_to_rounding``: also the serving
bank's rule for a copy against the served weight).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Sequence

import torch

from lorakit.combining.sources import AdapterUpdates, ModuleFactors
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.io.fingerprint import (
    is_quantized_format,
    rounded_copy,
    sample_values,
    within_dtype_rounding,
)
from lorakit.io.quantized_fingerprint import entries_difference

__all__ = [
    "carried_base_weights",
    "check_compatible",
    "fingerprint_difference",
    "layer_containers",
    "same_up_to_rounding",
]


def check_compatible(
    sources: Sequence[AdapterUpdates], model_modules: Collection[str] | None = None
) -> None:
    """Refuse (naming the module and both adapters) modules whose shape or kind differ between
    adapters, and base fingerprints that differ (``BaseModelMismatchError`` / ``UserError``);
    warn about adapters that share no module and adapt layers of different stacks
    (``_warn_different_stacks``; ``model_modules``: the module names of the model given, if
    any, which every module of an adapter of that model is one of)."""
    _check_shared_modules(sources)
    _warn_different_stacks(sources, model_modules)


def _check_shared_modules(sources: Sequence[AdapterUpdates]) -> None:
    """The module-by-module checks of ``check_compatible``: shape, kind, base fingerprint."""
    seen: dict[str, tuple[AdapterUpdates, ModuleFactors]] = {}
    prints: dict[str, tuple[AdapterUpdates, dict[str, object]]] = {}
    for source in sources:
        for name, factors in source.modules.items():
            if name in seen:
                first, known = seen[name]
                if known.shape != factors.shape or known.is_embedding != factors.is_embedding:
                    raise UserError(
                        f"module {name}: {first.label} adapts a {_kind(known)} and "
                        f"{source.label} a {_kind(factors)}; these adapters belong to "
                        "different base models and cannot be combined."
                    )
            else:
                seen[name] = (source, factors)
            stored = (source.fingerprint or {}).get(name)
            if stored is None:
                continue
            if name not in prints:
                prints[name] = (source, stored)
                continue
            first, known_print = prints[name]
            reason = fingerprint_difference(known_print, stored)
            if reason is not None:
                raise BaseModelMismatchError(
                    f"module {name}: {first.label} and {source.label} were trained on different "
                    f"base weights ({reason}); combine adapters of the same base model."
                )


def _kind(factors: ModuleFactors) -> str:
    d, k = factors.shape
    return f"{'embedding' if factors.is_embedding else 'linear'} layer with ΔW of shape ({d}, {k})"


_INDEXED = re.compile(r"(.+?)\.\d+(?:\.|$)")


def layer_containers(modules: Sequence[str]) -> frozenset[str]:
    """The layer stacks ``modules`` lie in: each name's prefix before its first numbered
    component (``model.layers.3.self_attn.q_proj`` -> ``model.layers``,
    ``transformer.h.0.attn.c_attn`` -> ``transformer.h``); a module outside any numbered stack
    (``lm_head``, ``model.embed_tokens``) has none."""
    return frozenset(m.group(1) for m in map(_INDEXED.match, modules) if m is not None)


def _warn_different_stacks(
    sources: Sequence[AdapterUpdates], model_modules: Collection[str] | None
) -> None:
    """Adapters of different base models may share no module name at all (a Llama adapter on
    ``q_proj``/``v_proj``, a GPT-2 one on ``c_attn``), and then the module checks see nothing.
    Two adapters are taken to be of one base when they share a module, share a layer stack
    (``layer_containers``), both fit the model given (on it, or every module of theirs one of
    ``model_modules``), or name the same ``base_model_name_or_path``; and so are adapters linked
    through others. When two adapters that both adapt numbered layers stay unlinked (stacks
    ``model.layers`` vs ``transformer.h``) a warning names both: they may be of different base
    models, and the result would fit neither; they may also be one model's encoder and decoder
    adapters, or saved from one model under two names, which PEFT combines, and so does lorakit.
    Adapters of one base with other targets (q_proj vs v_proj) share the stack; one that adapts
    only ``lm_head`` / embeddings has no stack and is never judged here."""
    stacks = [layer_containers(list(source.modules)) for source in sources]
    group = list(range(len(sources)))  # union-find over the sources

    def root(index: int) -> int:
        while group[index] != index:
            index = group[index]
        return index

    fits = [_fits(source, model_modules) for source in sources]
    for i in range(len(sources)):
        for j in range(i):
            if (fits[i] and fits[j]) or _same_base(sources[i], sources[j], stacks[i], stacks[j]):
                group[root(i)] = root(j)
    judged = [i for i, found in enumerate(stacks) if found]
    for i in judged[1:]:
        if root(i) != root(judged[0]):
            first = judged[0]
            message = _different_stacks(sources[first], stacks[first], sources[i], stacks[i])
            warnings.warn(message, UserWarning, stacklevel=4)
            return


def _fits(source: AdapterUpdates, model_modules: Collection[str] | None) -> bool:
    """The adapter is on the model given, or every module of it is one of the model's."""
    if source.on_model:
        return True
    return model_modules is not None and set(source.modules) <= set(model_modules)


def _same_base(first, second, first_stacks, second_stacks) -> bool:
    """Whether two adapters are known to be of one base (``_warn_different_stacks``)."""
    named = first.config.base_model_name_or_path
    return bool(
        first.modules.keys() & second.modules.keys()
        or first_stacks & second_stacks
        or (named and named == second.config.base_model_name_or_path)
    )


def _different_stacks(first, first_stacks, other, other_stacks) -> str:
    """The message of ``_warn_different_stacks``."""
    return (
        f"{first.label} adapts layers of {', '.join(sorted(first_stacks))} and {other.label} "
        f"layers of {', '.join(sorted(other_stacks))}, and they share no module: if they are "
        "adapters of different base models, the combined adapter fits neither (lorakit refuses "
        "it on load; peft skips the modules it does not find). Combine adapters of one base "
        "model; for one model's adapters (an encoder's and a decoder's), pass the model "
        "(model=...) or give both the same base_model_name_or_path, and this warning goes."
    )


def fingerprint_difference(first: dict[str, object], second: dict[str, object]) -> str | None:
    """None when two stored fingerprints of one module describe the same base weight (same
    shape; same sampled bytes, or within the coarser dtype's rounding when the dtypes differ; a quantized base's
    as ``load_adapter`` judges it, ``quantized_fingerprint.entries_difference``), else why not."""
    formats = (str(first["dtype"]), str(second["dtype"]))
    if any(is_quantized_format(name) for name in formats):  # (``bnb-nf4-dq``, ``gguf-Q4_1``...)
        return entries_difference(first, second)  # as loading judges: codes, scales, values
    if first["shape"] != second["shape"]:
        return f"base shapes {first['shape']} and {second['shape']}"
    if first["dtype"] == second["dtype"]:  # (or a bf16 checkpoint held as the fp32 one's type)
        same = first["sha256"] == second["sha256"] or rounded_copy(first, sample_values(second))
        return None if same else "sampled base weights differ"
    if within_dtype_rounding(sample_values(first), sample_values(second), *formats):
        return None  # (the coarser dtype's own rounding, as loading judges)
    return "sampled base weights differ beyond dtype rounding"


def carried_base_weights(sources: Sequence[AdapterUpdates]) -> dict[str, torch.Tensor]:
    """module -> the base weight the inputs carry for it: the copy of the finest dtype (the
    first input's among equals), which every other copy must equal up to the rounding of its
    own dtype (``same_up_to_rounding``), in whatever order the inputs come; else
    ``BaseModelMismatchError`` naming the module and both adapters. (Not combined: a base
    weight is the base's, not an update.)"""
    copies: dict[str, list[tuple[AdapterUpdates, torch.Tensor]]] = {}
    for source in sources:
        for name, weight in source.base_weights.items():
            copies.setdefault(name, []).append((source, weight))
    carried = {}
    for name, held in copies.items():
        finest, kept = min(held, key=lambda pair: torch.finfo(pair[1].dtype).eps)
        for source, weight in held:
            if not same_up_to_rounding(kept, weight):
                raise BaseModelMismatchError(_different_weights(name, finest, kept, source, weight))
        carried[name] = kept
    return carried


def _different_weights(name: str, first, known: torch.Tensor, other, weight: torch.Tensor) -> str:
    """The message of ``carried_base_weights`` for two copies that differ."""
    if known.shape != weight.shape:
        how = f"of shapes {list(known.shape)} and {list(weight.shape)}"
    else:
        how = f"with other values ({known.dtype} and {weight.dtype}, beyond rounding)"
    return (
        f"module {name}: {first.label} and {other.label} carry different base weights for it "
        f"({how}; saved by save_embedding_layers, e.g. after resizing the vocabulary), and "
        "combining cannot choose one. Combine adapters saved on the same embeddings, or "
        "re-save them without base weights (save_embedding_layers=False) if their base model "
        "is the same."
    )


def same_up_to_rounding(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Same shape and the same values once one is rounded to the other's dtype: a base weight
    saved from a bfloat16 copy of the model (``lorakit train --dtype bfloat16``) is the float32
    one rounded, and both are the same base; a float16 and a bfloat16 copy (neither holds the
    other) lie within half a step of each dtype of one value."""
    if first.shape != second.shape:
        return False
    if first.dtype == second.dtype:
        return torch.equal(first, second)
    if torch.equal(first.to(second.dtype), second) or torch.equal(second.to(first.dtype), first):
        return True
    if max(torch.finfo(first.dtype).bits, torch.finfo(second.dtype).bits) > 16:
        return False
    # float16 and bfloat16 copies: neither holds the other. Each rounds the same value to its
    # nearest, so they lie within half a step of their own dtype of it: |a - b| is at most half
    # of a's step plus half of b's (steps by nextafter, in each copy's dtype); values that are
    # not finite must be equal
    finite = first.isfinite() & second.isfinite()
    if not torch.equal(first.float()[~finite], second.float()[~finite]):
        return False
    a, b = first[finite], second[finite]
    gap = (a.float() - b.float()).abs()
    return bool((gap <= (_step(a) + _step(b)) / 2).all())


def _step(values: torch.Tensor) -> torch.Tensor:
    """The spacing of ``values``' dtype at each value (to the next one away from zero), as
    float32."""
    away = torch.where(values < 0, -torch.inf, torch.inf).to(values.dtype)
    return (torch.nextafter(values, away).float() - values.float()).abs()
