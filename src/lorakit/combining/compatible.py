"""Whether adapters may be combined at all: the same base model (``check_compatible``).

Adapters that share a module must agree on its shape and kind, and on its base weights where both
carry lorakit's base fingerprint (``lorakit.io.fingerprint``). Adapters that share no module and
adapt layers of different stacks (``model.layers`` vs ``transformer.h``) are warned about: a
Llama adapter on q_proj / v_proj and a GPT-2 one on c_attn share no module name, and the module
checks alone would see nothing; but one model's encoder and decoder adapters look the same, and
PEFT combines those.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Sequence

from lorakit.combining.sources import AdapterUpdates, ModuleFactors, fingerprint_difference
from lorakit.errors import BaseModelMismatchError, UserError

__all__ = ["check_compatible", "layer_containers"]


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
