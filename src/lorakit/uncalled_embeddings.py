"""The check, at ``inject``, for a targeted embedding that the model's forward never calls:
T5's and BART's ``shared`` under transformers 5, whose weight the separate
``encoder``/``decoder.embed_tokens`` modules hold as tie targets (``UnusedTargetWarning``);
the same for an embedding whose rows ``trainable_token_indices`` trains (its list form names
``get_input_embeddings()``, which is ``shared`` there)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from lorakit.errors import UnusedTargetWarning
from lorakit.state import parameter_holders
from lorakit.targets import original_module
from lorakit.unload import declared_ties, without_base_layers

__all__ = ["warn_uncalled_tied_embeddings", "warn_uncalled_token_embeddings"]


def warn_uncalled_tied_embeddings(model: nn.Module, targets: Sequence[str]) -> None:
    """Warn once (``UnusedTargetWarning``, at ``inject``), naming them, when ``targets`` hold
    an embedding that the forward never calls: the tie source whose weight other embedding
    modules hold as tie targets of it (``_tied_weights_keys``: ``encoder.embed_tokens.weight``
    -> ``shared.weight``). Under transformers 5 T5's and BART's ``shared`` is such a module:
    the encoder and decoder call their own ``embed_tokens`` modules, which hold
    ``shared.weight``, so a LoRA layer wrapping ``shared`` never runs and its factors get no
    gradient. PEFT 0.21.2 does the same, silently; the adapter is kept (and saved) as PEFT
    keeps it. Only a module named ``shared`` is such a source (transformers' name for the
    embedding an encoder and a decoder share): a tie source named otherwise is an embedding
    the forward calls too (FSMT's ``decoder.embed_tokens``, T5Gemma2's
    ``encoder.text_model.embed_tokens``), whatever other modules hold its weight."""
    uncalled = _uncalled(model, targets)
    if not uncalled:
        return
    described, instead, endings = _described(uncalled, "it reads")
    warnings.warn(
        f"the forward of this {type(model).__name__} never calls target module(s) "
        f"{described}: those are separate embedding modules holding the same (tied) weight, "
        "so the LoRA adapter there changes no output and trains nothing (PEFT does "
        f"the same). Target {instead} instead (or {endings} in target_modules).",
        UnusedTargetWarning,
        stacklevel=4,
    )


def warn_uncalled_token_embeddings(model: nn.Module, names: Sequence[str]) -> None:
    """Warn (``UnusedTargetWarning``) when ``trainable_token_indices`` trains rows of an
    embedding among ``names`` that the forward never calls (``warn_uncalled_tied_embeddings``'
    rule: BART's and T5's ``shared`` under transformers 5, which the list form names, being
    ``get_input_embeddings()``): those rows get no gradient and change no output. PEFT does
    the same, silently; the rows are kept (and saved), as PEFT keeps them."""
    uncalled = _uncalled(model, names, held=False)
    if not uncalled:
        return
    described, instead, endings = _described(uncalled, "the forward calls")
    warnings.warn(
        f"trainable_token_indices trains rows of {described}, which the forward of this "
        f"{type(model).__name__} never calls: separate embedding modules hold the same (tied) "
        "weight, so those rows change no output and get no gradient (PEFT does the same). "
        f"Name the embeddings the forward calls: trainable_token_indices={{{endings[0]!r}: "
        f"[...]}} (it trains rows of {instead}).",
        UnusedTargetWarning,
        stacklevel=2,
    )


def _described(uncalled: Mapping[str, list[str]], reading: str) -> tuple[str, list[str], list[str]]:
    """What both warnings say of ``uncalled`` (``_uncalled``'s map): each embedding with its
    readers (``"'shared' (<reading> [...])"``, joined by "; "), the readers sorted, and the
    sorted last parts of their names (``embed_tokens``: what ``target_modules`` can name)."""
    described = "; ".join(f"{name!r} ({reading} {readers})" for name, readers in uncalled.items())
    instead = sorted({reader for readers in uncalled.values() for reader in readers})
    return described, instead, sorted({reader.rpartition(".")[2] for reader in instead})


def _uncalled(model: nn.Module, names: Sequence[str], held: bool = True) -> dict[str, list[str]]:
    """``{name: the embeddings the forward calls instead}`` for each embedding among ``names``
    named ``shared`` that the forward never calls: embeddings declared as tie targets of it
    that hold its weight (``_tie_readers``), or with ``held=False`` whether or not they hold
    it (a config with ``tie_word_embeddings=False`` gives them weights of their own, and the
    forward still calls them, not ``shared``)."""
    embeddings = [
        n
        for n in names
        if n.rpartition(".")[2] == "shared"
        and isinstance(original_module(model.get_submodule(n)), nn.Embedding)
    ]
    if not embeddings:  # (the common case: no tie mapping is read)
        return {}
    holders, ties = parameter_holders(model), declared_ties(model)
    uncalled = {}
    for name in embeddings:
        if held:
            readers = _tie_readers(model, name, holders, ties)
        else:
            readers = _declared_readers(model, name, ties)
        if readers:
            uncalled[name] = readers
    return uncalled


def _tie_readers(
    model: nn.Module,
    name: str,
    holders: Mapping[int, list[str]],
    ties: Mapping[str, str | None],
) -> list[str]:
    """The other embedding modules of ``model`` holding the weight of the embedding ``name``
    (a target) as a declared tie target of it (``ties``: ``unload.declared_ties``; ``holders``:
    ``state.parameter_holders``), in model order, named without lorakit's ``base_layer``
    segments; [] where there are none (the forward calls ``name`` then)."""
    base = original_module(model.get_submodule(name))
    source = f"{name}.weight" if name else "weight"
    readers = []
    for held in holders.get(id(base.weight), ()):
        plain = without_base_layers(held)
        module = original_module(model.get_submodule(held.rpartition(".")[0]))
        if ties.get(plain) == source and module is not base and isinstance(module, nn.Embedding):
            readers.append(plain.rpartition(".")[0])
    return readers


def _declared_readers(model: nn.Module, name: str, ties: Mapping[str, str | None]) -> list[str]:
    """The other embedding modules of ``model`` whose weight ``ties`` (``unload.declared_ties``)
    declares a tie target of the embedding ``name``'s, whatever weight they hold now."""
    base = original_module(model.get_submodule(name))
    source = f"{name}.weight" if name else "weight"
    readers = []
    for target, tied_to in ties.items():
        path, _, leaf = target.rpartition(".")
        if tied_to != source or leaf != "weight":
            continue
        module = original_module(model.get_submodule(path))
        if module is not base and isinstance(module, nn.Embedding):
            readers.append(path)
    return readers
