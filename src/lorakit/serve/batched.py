"""The batched multi-adapter op: every row of a batch adds its own adapter's low-rank output.

Semantics (punica's SGMV), for rows ``i`` of ``x`` (N, k) and slots ``slot[i]``::

    y[i] = base(x)[i] + s[slot[i]] * B[slot[i]] A[slot[i]] x[i]       (slot[i] = -1: y[i] = base(x)[i])

with each adapter's A and B spread over its rank-granular pages (``stacks``): B A x is the sum
over its pages p of B_p A_p x, so an adapter's cost follows its own rank, never the largest
rank of the batch or of the bank. The rows are grouped into segments of equal slot once per
forward (``row_groups.group_rows``, with the bank's page table); every layer of that forward
reuses the groups. Two ways to run the segments, chosen per segment by its size:

- looped: one pair of small matmuls per segment (``functional.lora_forward``) against its pages
  as (r, k) and (d, r): a slice of the pools when the pages are consecutive (the bank's usual
  placement, no copy), else gathered; rows sliced when contiguous; for segments of
  ``LOOP_MIN_ROWS`` rows or more;
- padded: the short segments (decode with many adapters, per-token choices) of the adapters
  that adapt this layer, a grid per length bucket (``row_groups``): one grid entry per window of
  b consecutive pages of a segment (one window per adapter when the grid's adapters share a
  rank, one page each when their ranks are mixed), the segment's rows gathered into (E, L, k)
  padded to the grid's longest segment (L), two batched matmuls against the E windows
  (A (E, b*p, k), B^T (E, b*p, d)), read in place from the pools when they lie in a compact run,
  and every entry's valid rows added back into its rows. A fixed number of operations per
  bucket whatever the number of adapters and their ranks; with one row per segment this is
  punica's BGMV.

Results are added into the base layer's output in place (inference only, no autograd).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lorakit import functional
from lorakit.layers import row_router
from lorakit.serve.bank import AdapterBank
from lorakit.serve.row_groups import (
    LOOP_MIN_ROWS,
    PaddedSegments,
    RowGroups,
    Segment,
    group_rows,
)
from lorakit.serve.stacks import LayerStack

__all__ = [
    "LOOP_MIN_ROWS",
    "BankRouter",
    "PaddedSegments",
    "RowGroups",
    "Segment",
    "add_dora_gains",
    "add_lora_looped",
    "add_lora_padded",
    "group_rows",
    "routed",
]


def add_lora_looped(
    out: torch.Tensor, x: torch.Tensor, stack: LayerStack, groups: RowGroups
) -> None:
    """``out[rows] += s B A x[rows]`` per looped segment. ``out`` (N, d), ``x`` (N, k), in place;
    A (n*p, k) and B (d, n*p) from the segment's n pages (a slice of the pools when consecutive);
    the product in ``stack.compute_dtype`` (x and 16-bit pages widened), added in ``out``'s."""
    for segment in groups.looped:
        if segment.slot not in stack.present:
            continue
        lora_A, lora_B_t = _segment_pages(stack, segment)  # (n*p, k), (n*p, d)
        rows = segment.rows
        x_rows = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        delta = functional.lora_forward(
            x_rows.to(stack.compute_dtype), lora_A, lora_B_t.T, stack.scaling_values[segment.slot]
        ).to(out.dtype)  # (n, d), computed in compute_dtype
        if isinstance(rows, slice):
            out[rows] += delta
        else:
            out.index_add_(0, rows, delta)


def _segment_pages(stack: LayerStack, segment: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    """A (n*p, k) and B^T (n*p, d) of the segment's n pages: views when they are consecutive."""
    if segment.first_page is not None:
        pages = slice(segment.first_page, segment.first_page + segment.pages.numel())
        return stack.lora_A[pages].flatten(0, 1), stack.lora_B_t[pages].flatten(0, 1)
    pages = segment.pages.to(stack.lora_A.device)
    lora_A = stack.lora_A.index_select(0, pages).flatten(0, 1)
    return lora_A, stack.lora_B_t.index_select(0, pages).flatten(0, 1)


def _windows(pool: torch.Tensor, grid: PaddedSegments) -> torch.Tensor:
    """The grid's entries of a page pool (pages, p, m) as (E, b*p, m): the pool viewed as windows
    of b = ``grid.block`` pages, then the run of them (a view) or the listed ones (a copy)."""
    pages, page_rank, width = pool.shape
    usable = pages // grid.block * grid.block
    windows = pool[:usable].view(usable // grid.block, grid.block * page_rank, width)
    if grid.window_run is not None:
        return windows[grid.window_run]
    return windows.index_select(0, grid.windows.to(pool.device))


def add_lora_padded(
    out: torch.Tensor, x: torch.Tensor, stack: LayerStack, grid: PaddedSegments
) -> None:
    """The segments of one grid at once: ``out[i] += s[slot] * sum_w B_w (A_w x[i])`` over the
    windows w of row i's slot (``row_groups.PaddedSegments``: b consecutive pages each).

    Shapes: x gathered (E, L, k); A windows (E, b*p, k); low (E, L, b*p); B^T windows
    (E, b*p, d); delta (E, L, d). Rank side first, scale on the rank side (as
    ``functional.lora_forward``), in ``stack.compute_dtype`` (16-bit windows widened). The grid
    holds only adapters of this layer; the results of filler entries (whatever their pages
    hold) are dropped with the padding.
    """
    entries, length, dtype = grid.entry_slots.numel(), grid.length, stack.compute_dtype
    x_rows = x.index_select(0, grid.gather_rows).to(dtype)
    x_rows = x_rows.view(entries, length, x.shape[-1])  # (E, L, k)
    lora_A = _windows(stack.lora_A, grid).to(dtype)  # (E, b*p, k)
    lora_B_t = _windows(stack.lora_B_t, grid).to(dtype)  # (E, b*p, d)
    scaling = stack.scaling.index_select(0, grid.entry_slots.to(stack.scaling.device))
    low = torch.bmm(x_rows, lora_A.transpose(1, 2))  # (E, L, b*p)
    low = low * scaling.to(low.dtype).view(-1, 1, 1)
    delta = torch.bmm(low, lora_B_t).view(entries * length, -1)  # (E*L, d)
    if grid.valid is not None:
        delta = delta.index_select(0, grid.valid)  # (M, d)
    out.index_add_(0, grid.dest_rows, delta.to(out.dtype))


def add_dora_gains(
    out: torch.Tensor, stack: LayerStack, groups: RowGroups, bias: torch.Tensor | None
) -> None:
    """``out[i] += (f - 1)[slot[i]] * (out[i] - b)``: a DoRA slot's per-output scale of its rows'
    base output (bias excluded); LoRA slots and rows without an adapter have gain 0. ``out``
    (N, d) holds the base output; gathered gains (N, d)."""
    none = stack.dora_gain.shape[0] - 1  # the all-zero row
    row_slots = groups.row_slots.to(out.device)
    gains = stack.dora_gain.index_select(0, torch.where(row_slots >= 0, row_slots, none))
    base = out if bias is None else out - bias
    out.addcmul_(base, gains.to(out.dtype))


class BankRouter:
    """The ``row_router`` callable: each LoRA layer's rows get their slot's adapter from the bank."""

    def __init__(self, bank: AdapterBank, groups: RowGroups) -> None:
        self.bank = bank
        self.groups = groups

    def __call__(
        self, layer: torch.nn.Module, x: torch.Tensor, base_output: torch.Tensor
    ) -> torch.Tensor:
        stack = self.bank.stack_for(layer)
        if stack is None or not (stack.present & self.groups.slots):
            return base_output  # a layer no adapter of this batch touches (or not routed)
        rows = x.shape[:-1].numel()
        if rows != self.groups.num_rows:
            raise ValueError(
                f"layer {stack.name!r} got {rows} rows but the row groups have {self.groups.num_rows} "
                "slots; give one slot per token (batch * sequence)."
            )
        out = base_output.view(rows, base_output.shape[-1])  # shares storage: in-place adds
        flat_x = x.reshape(rows, x.shape[-1])
        if stack.dora_slots & self.groups.slots:  # before the LoRA adds: it scales the base output
            add_dora_gains(out, stack, self.groups, getattr(layer.base_layer, "bias", None))
        if self.groups.looped:
            add_lora_looped(out, flat_x, stack, self.groups)
        row_bytes = (flat_x.shape[-1] + out.shape[-1]) * flat_x.element_size()
        for grid in self.groups.padded(stack.present, row_bytes):
            add_lora_padded(out, flat_x, stack, grid)
        return base_output


@contextmanager
def routed(
    bank: AdapterBank, token_slots: torch.Tensor | Sequence[int], mode: str | None = None
) -> Iterator[RowGroups]:
    """Within the block, every forward of the bank's model adds each token's adapter.

    ``token_slots``: one slot per token, shaped like ``input_ids`` (B, T) or flat (B*T,);
    a per-sequence choice (B,) is expanded with ``token_slots[:, None].expand(B, T)`` by the caller.
    """
    groups = group_rows(token_slots, bank.page_table, mode=mode)
    with torch.no_grad(), row_router(BankRouter(bank, groups)):
        yield groups
