"""The checks behind ``trainable_token_indices`` (``layers.tokens``): which embeddings a dict's
keys name (PEFT's rule), what an embedding cannot take (ids outside its vocabulary, a weight tied
to the output layer), and which adapters' rows may not be merged together (shared ids)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.saved import ModulesToSave

__all__ = [
    "TokenIdsOutsideVocabulary",
    "check_embedding",
    "keyed_targets",
    "shared_rows",
]

TIED_DOCS = 'docs/migrating-from-peft.md, "Trainable tokens on tied embeddings"'


class TokenIdsOutsideVocabulary(ValueError):
    """Token ids at or beyond an embedding's number of rows (a ``ValueError``); ``module_name``,
    ``ids`` and ``size`` (the embedding's rows) say which, for a loader to advise a resize."""

    def __init__(self, message: str, module_name: str, ids: list[int], size: int) -> None:
        super().__init__(message)
        self.module_name, self.ids, self.size = module_name, ids, size


def keyed_targets(
    model: nn.Module, indices: Mapping[str, list[int]], modules: Mapping[str, nn.Module]
) -> dict[str, list[int]]:
    """``{module name: ids}`` for the dict form: a key names each module whose name is the key
    or ends with ``"." + key`` (PEFT's ``_is_valid_match``: ``"embed_tokens"`` names
    ``model.embed_tokens``, not ``type_embed_tokens``; ``"tokens"`` names neither). Keys
    naming no module are one ``ValueError`` naming them all and the model's embeddings."""
    found: dict[str, list[int]] = {}
    missing = []
    for key, wanted in indices.items():
        names = [n for n in modules if n and (n == key or n.endswith("." + key))]
        if not names:
            missing.append(key)
        found |= {name: list(wanted) for name in names}
    if missing:
        embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
        shown = f"key {missing[0]!r} matches" if len(missing) == 1 else f"keys {missing} match"
        raise ValueError(
            f"trainable_token_indices {shown} no module of this "
            f"{type(model).__name__}: a key is a module's full name or its end after a dot "
            f"(PEFT's rule: 'embed_tokens' names 'model.embed_tokens'). Its embeddings are "
            f"{embeddings}."
        )
    return found


def check_embedding(model: nn.Module, name: str, module: nn.Module, indices: list[int]) -> None:
    """``ValueError`` when the module ``name`` cannot have rows ``indices`` trained: not an
    ``nn.Embedding``, ids outside its vocabulary (``TokenIdsOutsideVocabulary``), or its
    weight tied to the output layer (not implemented; the message gives the ways out)."""
    if not isinstance(module, nn.Embedding):
        raise ValueError(
            f"trainable_token_indices names {name!r}, a {type(module).__name__}; lorakit trains "
            "token rows of nn.Embedding modules only."
        )
    bad = [i for i in indices if not 0 <= i < module.num_embeddings]
    if bad:
        raise TokenIdsOutsideVocabulary(
            f"trainable_token_indices for {name!r}: {bad} outside the vocabulary "
            f"(0..{module.num_embeddings - 1}); for new tokens, resize the vocabulary first "
            f"(model.resize_token_embeddings(N), N > {max(bad)}).",
            name,
            bad,
            module.num_embeddings,
        )
    if _tied_to_output(model, module):
        raise ValueError(_tied_message(name))


def _tied_message(name: str) -> str:
    return (
        f"trainable_token_indices on {name!r}, whose weight is tied to the output layer: not "
        "implemented in lorakit. PEFT puts the rows in the output layer too, so a PEFT adapter "
        "from a tied model also changes those tokens' logits, which rows in the input "
        "embedding alone do not (loading it into untied embeddings gives other logits). For "
        "such a file: use peft, or for inference load it into a copy whose output layer holds "
        "a clone of the weight, merge_and_unload, and tie the output layer to the merged "
        f"embedding again ({TIED_DOCS}). To train new rows with lorakit (in the input "
        "embedding only), first give the output layer a clone: model.lm_head.weight = "
        "torch.nn.Parameter(model.lm_head.weight.detach().clone()); "
        "model.config.tie_word_embeddings = False (from_pretrained(..., "
        "tie_word_embeddings=False) re-initialises it instead). Nothing was changed."
    )


def shared_rows(rows: Mapping[str, Sequence[int]]) -> tuple[str, list[str], list[int]] | None:
    """PEFT's check before merging token rows (``_check_overlapping_tokens``): going through
    ``rows`` (``{adapter: ids}``, merged ones first) in order, the first adapter whose ids meet
    those of the adapters before it, as ``(adapter, those earlier adapters, shared ids)``; None
    when the sets are disjoint (only then is the merged table independent of the order)."""
    seen: dict[int, str] = {}
    for adapter, ids in rows.items():
        shared = sorted(set(ids) & set(seen))
        if shared:
            return adapter, sorted({seen[i] for i in shared}), shared
        seen |= {i: adapter for i in ids}
    return None


def _tied_to_output(model: nn.Module, embedding: nn.Module) -> bool:
    """Whether ``embedding`` (an original module) and the model's output layer were built on
    one weight Parameter. Decided on the unwrapped modules' ORIGINAL weights, so that what
    wraps them now changes nothing (inject and ``load_adapter`` on a fresh model then give
    the same answer): the output layer is looked for inside saved-module wrappers
    (``original_module``) and LoRA layers (``base_layer``), and a weight a merged LoRA layer
    installed stands for the original it keeps aside (merging unties a tied weight only until
    ``unmerge``, which puts the shared Parameter back)."""
    output = getattr(model, "get_output_embeddings", lambda: None)()
    while isinstance(output, (ModulesToSave, LoraLayer)):
        output = output.original_module if isinstance(output, ModulesToSave) else output.base_layer
    output_weight = getattr(output, "weight", None)
    if output_weight is None:
        return False
    originals = _merged_originals(model)
    original = originals.get(id(output_weight), output_weight)
    return original is originals.get(id(embedding.weight), embedding.weight)


def _merged_originals(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{id(merged weight): original weight}`` for every merged LoRA layer of ``model`` that
    installed its merged weight in the base (a quantized base keeps it aside: not listed)."""
    originals = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            state, original = module.read_merge_state()
            if state.adapters and state.weight is not None and state.original is not None:
                originals[id(state.weight)] = original
    return originals
