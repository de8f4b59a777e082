"""The check, at ``inject``, for a targeted embedding that the model's forward never calls:
T5's and BART's ``shared`` under transformers 5, whose weight the separate
``encoder``/``decoder.embed_tokens`` modules hold as tie targets (``UnusedTargetWarning``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from lorakit.errors import UnusedTargetWarning
from lorakit.state import parameter_holders
from lorakit.targets import original_module
from lorakit.unload import declared_ties, without_base_layers

__all__ = ["warn_uncalled_tied_embeddings"]


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
    embeddings = [
        n
        for n in targets
        if n.rpartition(".")[2] == "shared"
        and isinstance(original_module(model.get_submodule(n)), nn.Embedding)
    ]
    if not embeddings:  # (the common case: no tie mapping is read)
        return
    holders, ties = parameter_holders(model), declared_ties(model)
    uncalled = {}
    for name in embeddings:
        readers = _tie_readers(model, name, holders, ties)
        if readers:
            uncalled[name] = readers
    if not uncalled:
        return
    described = "; ".join(f"{name!r} (it reads {readers})" for name, readers in uncalled.items())
    instead = sorted({reader for readers in uncalled.values() for reader in readers})
    endings = sorted({reader.rpartition(".")[2] for reader in instead})
    warnings.warn(
        f"the forward of this {type(model).__name__} never calls target module(s) "
        f"{described}: those are separate embedding modules holding the same (tied) weight, "
        "so the LoRA adapter there changes no output and trains nothing (PEFT does "
        f"the same). Target {instead} instead (or {endings} in target_modules).",
        UnusedTargetWarning,
        stacklevel=4,
    )


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
