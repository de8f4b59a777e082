"""EVA's layer inputs (``lorakit.eva``): which rows of a layer's input count, and their running
moments.

A layer input ``x`` of shape (batch, T, k) from a batch given as a dict counts the positions
where the batch's ``attention_mask`` is 1 and (``use_label_mask``) its ``labels`` are not
``label_mask_value`` -- whether the batch holds ``input_ids`` or ``inputs_embeds`` -- and
each mask must have ``x``'s (batch, T) shape (``ValueError`` otherwise). Any other input (2-D,
or a batch that is not a dict, or one without those masks) counts every row. An input needs at
least as many counted tokens, over the loader, as the components its layers may take
(``round(r * rho)``, the largest of its layers'), at most k + 1 of them (an input of width k
has only k components: k + 1 tokens determine them all), and at least 2
(``check_enough_tokens``, ``tokens_needed``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from lorakit.init_methods import EvaConfig

__all__ = ["check_enough_tokens", "token_rows", "tokens_needed"]

_POSITIONS_REMEDY = (
    "Leave such layers out of the adapter (exclude_modules), or give batches that are not "
    "dicts (a tuple, run by a forward_fn): every position then counts."
)
_LABELS_REMEDY = "Set EvaConfig(use_label_mask=False), or give batches without 'labels'."


class _InputMoments:
    """Running ``n``, ``sum x`` and ``sum x x^T`` (float64) of one layer input's rows."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)  # (n, k)
        if self.total is None:
            self.total = rows.new_zeros(rows.shape[1])
            self.outer = rows.new_zeros(rows.shape[1], rows.shape[1])
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer.addmm_(rows.T, rows)  # in place: no k x k temporary


def _check_fits(name: str, x: torch.Tensor, mask: torch.Tensor, what: str, remedy: str) -> None:
    """``ValueError`` unless ``mask`` (batch, T) has the positions of layer input ``x``."""
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"EVA: layer {name!r} reads an input of shape {tuple(x.shape)}, but the batch's "
            f"{what} has shape {tuple(mask.shape)}: its positions are not that layer's (e.g. "
            f"an encoder-decoder model's other sequence), so they cannot say which of the "
            f"layer's tokens count. {remedy}"
        )


def _masks(batch: Mapping, config: EvaConfig) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(what, positions that count (batch, T) bool, remedy)`` for each mask the batch has:
    its ``attention_mask`` (without one, ``input_ids``: all its positions), and with
    ``use_label_mask`` its ``labels`` != ``label_mask_value``. Batches of ``inputs_embeds``
    are masked as those of ``input_ids`` are."""
    if batch.get("attention_mask") is not None:
        yield "attention_mask", torch.as_tensor(batch["attention_mask"]).bool(), _POSITIONS_REMEDY
    elif batch.get("input_ids") is not None:
        ids = torch.as_tensor(batch["input_ids"])
        yield "input_ids", torch.ones_like(ids, dtype=torch.bool), _POSITIONS_REMEDY
    if config.use_label_mask and batch.get("labels") is not None:
        labels = torch.as_tensor(batch["labels"])
        yield "labels", labels != config.label_mask_value, _LABELS_REMEDY


def token_rows(name: str, x: torch.Tensor, batch: object, config: EvaConfig) -> torch.Tensor:
    """The rows of layer ``name``'s input ``x`` (..., k) that count (module docstring), as
    (n, k); ``ValueError`` when a mask of the batch does not have ``x``'s (batch, T) shape."""
    keep = None
    if isinstance(batch, Mapping) and x.dim() == 3:
        for what, mask, remedy in _masks(batch, config):
            _check_fits(name, x, mask, what, remedy)
            mask = mask.to(x.device)
            keep = mask if keep is None else keep & mask
    return x.reshape(-1, x.shape[-1]) if keep is None else x[keep]


def tokens_needed(wanted: int, width: int | None) -> int:
    """The counted tokens an input of ``width`` (k) needs for ``wanted`` components:
    ``min(wanted, k + 1)``, at least 2 (``wanted`` where no row gave the width). Up to k, peft's ``SVDHook`` rule (a call with fewer
    tokens than its ``n_components`` is skipped); past k only k components exist (peft's
    incremental PCA refuses ``n_components > n_features``), and k + 1 centred tokens span all k
    (n tokens span at most n - 1)."""
    return max(2, wanted if width is None else min(wanted, width + 1))


def check_enough_tokens(
    leader: Mapping[str, str],
    counts: Mapping[str, int],
    wanted: Mapping[str, int],
    widths: Mapping[str, int | None],
) -> None:
    """``ValueError`` naming each layer input (by the layers that read it; ``leader``: layer
    -> the input's first layer) whose counted tokens ``counts[input]`` are fewer than
    ``tokens_needed(wanted[input], widths[input])``: n tokens give a covariance of rank at most
    n - 1, so the components past it would be arbitrary directions of zero variance, and the
    rank split decided by ties of zeros. Raised before the model is changed."""
    short = {}
    for lead, count in counts.items():
        needed = tokens_needed(wanted.get(lead, 0), widths.get(lead))
        if count < needed:
            readers = [name for name, first in leader.items() if first == lead]
            short[lead] = f"the input of {readers}: {count} tokens counted, {needed} needed"
    if short:
        raise ValueError(
            "EVA: too few counted tokens for the principal components the layers need ("
            + "; ".join(list(short.values())[:4])
            + (f"; and {len(short) - 4} more layer inputs" if len(short) > 4 else "")
            + "). A layer input needs at least as many counted tokens as the components its "
            "layers may take, round(r * rho) (the largest of theirs; an input of width k has "
            "k, which k + 1 tokens determine), and at least 2: n tokens give only n - 1 "
            "directions with variance. Give more batches or longer sequences "
            "(check that attention_mask / labels leave tokens to count; "
            "EvaConfig(use_label_mask=False) counts the prompt tokens too), use a smaller r or "
            "rho, or leave those layers out of the adapter (exclude_modules). The model was "
            "left unchanged."
        )
