"""Rotary embeddings that depend on the sequence length, computed per row of a batch.

Two of transformers' rotary kinds pick their frequencies from the largest position they are
called with (``transformers.modeling_rope_utils.dynamic_rope_update``):

- ``longrope`` (Phi-3 / Phi-3.5 / Phi-4-mini): the long factors when ``max(position) + 1``
  passes ``original_max_position_embeddings``, the short ones otherwise;
- ``dynamic`` (dynamic NTK scaling): frequencies recomputed for ``max(position) + 1`` past the
  original context, kept (a state on the module) until a call below it resets them.

Called with a batch (B, T) of position ids, every row gets the frequencies of the batch's
largest position: one request past the original context changes every other row's rotation,
and a dynamic module's state makes a row's rotation depend on what ran before. ``per_row``
wraps such a module so that each row of a batch is rotated as the same sequence alone on a fresh
model (``model.generate``): rows are grouped by what decides their frequencies (their largest
position past the threshold, or "within it"), the module runs once per group, and the groups'
``(cos, sin)`` are put back in row order. In the usual case (every row within the original
context, or every row past it for longrope) that is one call, as before; a dynamic module is
first reset (a call at position 0) so its state never carries over from an earlier call.

One more step makes ``longrope`` what a sequence gets from transformers' Phi-3 ``generate``: a
sequence whose prompt is within the original context is rotated with the short factors, and
when it grows past it, Phi-3 drops its cache and runs the whole sequence again with the long
ones (``Phi3ForCausalLM.prepare_inputs_for_generation``; Phimoe and Phi-4-multimodal too), so
that every position is rotated with the factors of the sequence's current length.
``recompute_length`` is that length; the engine prefills such a request again, alone, at that
step (``prefill.Prefill``). Other models keep their cache, as their ``generate`` does (a Llama
config with ``longrope``, and ``dynamic``).

The serving engine wraps its model's rotary modules (``Engine``); then batched decode and
batched prefill are exact for these models too.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_length_dependent", "length_dependent_rotaries", "per_row", "recompute_length"]


def _kind(module: nn.Module, layer_type: str | None) -> str:
    kind = getattr(module, "rope_type", "")
    if isinstance(kind, dict):
        kind = kind.get(layer_type, "") if layer_type is not None else ""
    return str(kind)


def is_length_dependent(module: nn.Module) -> bool:
    """Whether ``module``'s rotary kind (or one of its per-layer-type kinds) is ``dynamic`` or
    ``longrope``."""
    kinds = getattr(module, "rope_type", None)
    kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
    return any("dynamic" in str(k) or "longrope" in str(k) for k in kinds)


def length_dependent_rotaries(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose rotary kind is ``dynamic`` or ``longrope``."""
    return [m for m in model.modules() if is_length_dependent(m)]


CACHE_DROPPING_FAMILIES = ("phi3", "phimoe", "phi4_multimodal")
"""The model types whose ``generate`` drops the cache when a sequence first passes
``config.original_max_position_embeddings`` (their ``prepare_inputs_for_generation``)."""


def recompute_length(model: nn.Module) -> int | None:
    """The sequence length at which the engine runs a sequence again whole, as the model's own
    ``generate`` does (module docstring): ``config.original_max_position_embeddings + 1`` for
    the families that drop their cache there (``CACHE_DROPPING_FAMILIES``) and have a
    length-dependent rotary embedding (without one the values would not change); None for every
    other model (a Llama with ``longrope`` keeps its cache in ``generate``, and here)."""
    config = getattr(model, "config", None)
    original = getattr(config, "original_max_position_embeddings", None)
    family = getattr(config, "model_type", None)
    if family not in CACHE_DROPPING_FAMILIES or not isinstance(original, int):
        return None
    return original + 1 if length_dependent_rotaries(model) else None


def _threshold(module: nn.Module, kind: str, layer_type: str | None) -> int | None:
    """The length up to which the frequencies do not change (None: unknown here, and every
    distinct length is its own group, still exact)."""
    if "dynamic" in kind:
        value = getattr(module, "original_max_seq_len", None)
    else:
        parameters = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
        if layer_type is not None:
            parameters = parameters.get(layer_type) or {}
        value = parameters.get("original_max_position_embeddings")
    return int(value) if isinstance(value, int | float) else None


def _row_keys(lengths: list[int], kind: str, threshold: int | None) -> list[int]:
    """What decides each row's frequencies: 0 within the threshold; past it, 1 for longrope
    (one long set) and the length itself for dynamic (frequencies for that length)."""
    if threshold is None:
        return lengths
    return [0 if n <= threshold else (n if "dynamic" in kind else 1) for n in lengths]


def _per_row_forward(module: nn.Module, inner, x, position_ids, *args, **kwargs):
    layer_type = kwargs.get("layer_type", args[0] if args else None)
    kind = _kind(module, layer_type)
    if not ("dynamic" in kind or "longrope" in kind):
        return inner(x, position_ids, *args, **kwargs)
    lengths = (position_ids.amax(dim=-1) + 1).tolist()  # (B,): each row's largest position + 1
    keys = _row_keys(lengths, kind, _threshold(module, kind, layer_type))
    dynamic = "dynamic" in kind
    if len(set(keys)) == 1 and not dynamic:
        return inner(x, position_ids, *args, **kwargs)
    groups: dict[int, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    parts, order = [], []
    for key in sorted(groups):  # ascending: a dynamic module only grows between resets
        rows = groups[key]
        if dynamic:  # back to the original frequencies first, whatever ran before
            inner(x[:1], torch.zeros_like(position_ids[:1, :1]), *args, **kwargs)
        index = torch.tensor(rows, device=position_ids.device)
        parts.append(
            inner(x.index_select(0, index), position_ids.index_select(0, index), *args, **kwargs)
        )
        order.extend(rows)
    if len(parts) == 1:
        return parts[0]
    back = torch.empty(len(order), dtype=torch.long, device=position_ids.device)
    back[torch.tensor(order, device=position_ids.device)] = torch.arange(
        len(order), device=back.device
    )
    return tuple(
        torch.cat(pieces, dim=0).index_select(0, back) for pieces in zip(*parts, strict=True)
    )


class _PerRow:
    """The wrapped ``forward``: a class, not a closure, so that ``copy.deepcopy`` of the model
    gives the copy a forward of its own module (a closure would still point at the original)."""

    def __init__(self, module: nn.Module, inner) -> None:
        self.module, self.inner = module, inner

    def __call__(self, x, position_ids, *args, **kwargs):
        return _per_row_forward(self.module, self.inner, x, position_ids, *args, **kwargs)


def per_row(module: nn.Module) -> None:
    """Make ``module`` (a rotary embedding, ``forward(x, position_ids[, layer_type])`` returning
    ``(cos, sin)`` of shape (B, T, head_dim)) rotate every row of a batch as that row alone on
    a fresh model (module docstring). Idempotent; the module's own ``forward`` runs inside."""
    if not isinstance(module.__dict__.get("forward"), _PerRow):
        module.forward = _PerRow(module, module.forward)
