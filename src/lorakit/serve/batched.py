"""The batched multi-adapter op: every row of a batch adds its own adapter's low-rank output.

Semantics (punica's SGMV), for rows ``i`` of ``x`` (N, k) and slots ``slot[i]``::

    y[i] = base(x)[i] + s[slot[i]] * B[slot[i]] A[slot[i]] x[i]       (slot[i] = -1: y[i] = base(x)[i])

with each adapter's A and B spread over its rank-granular pages (``stacks``): B A x is the sum
over its pages p of B_p A_p x, so an adapter's cost follows its own rank, never the largest
rank of the batch or of the bank. The rows are grouped into segments of equal slot once per
forward (``group_rows``, with the bank's page table); every layer of that forward reuses the
groups. Two ways to run the segments, chosen per segment by its size:

- looped: one pair of small matmuls per segment (``functional.lora_forward``) against its pages
  gathered into (r, k) and (d, r), on a slice of rows when they are contiguous (no copy), for
  segments of ``LOOP_MIN_ROWS`` rows or more;
- padded: all the short segments at once (decode with many adapters, per-token choices): one
  grid entry per (segment, page), the segment's rows gathered into (E, L, k) padded to the
  longest segment (L), two batched matmuls against the E pages (A (E, p, k), B^T (E, p, d)),
  and every entry's valid rows added back into its rows. A fixed number of operations whatever
  the number of adapters and their ranks; with one row per segment this is punica's BGMV.

Results are added into the base layer's output in place (inference only, no autograd).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lorakit import functional
from lorakit.layers import row_router
from lorakit.serve.bank import AdapterBank
from lorakit.serve.stacks import LayerStack

__all__ = [
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

# Segments with at least this many rows run as their own pair of matmuls; shorter ones are padded
# and batched together (when there are at least two of them).
LOOP_MIN_ROWS = 16


@dataclass(frozen=True)
class Segment:
    """Rows sharing one adapter slot: a ``slice`` when contiguous, else a LongTensor of rows;
    ``pages`` (n,) the slot's pages."""

    slot: int
    rows: slice | torch.Tensor
    pages: torch.Tensor


@dataclass(frozen=True)
class PaddedSegments:
    """E = sum over the short segments of their pages, each segment padded to L rows:
    ``gather_rows`` (E*L,) rows of x (padding repeats a valid row), ``entry_pages`` (E,) and
    ``entry_slots`` (E,) each grid entry's page and slot, ``valid`` (M,) positions of real rows
    in the E*L grid (None: no padding), ``dest_rows`` (M,) where their results go."""

    entry_pages: torch.Tensor
    entry_slots: torch.Tensor
    length: int
    gather_rows: torch.Tensor
    valid: torch.Tensor | None
    dest_rows: torch.Tensor
    slots: frozenset[int]


@dataclass(frozen=True)
class RowGroups:
    """How the N rows of one forward map to adapter slots (built once, used by every layer)."""

    num_rows: int
    looped: tuple[Segment, ...]
    padded: PaddedSegments | None
    slots: frozenset[int]
    row_slots: torch.Tensor | None = None  # (N,) each row's slot, -1 for none (DoRA's gains)


def group_rows(
    row_slots: torch.Tensor | Sequence[int],
    page_table: Mapping[int, torch.Tensor],
    mode: str | None = None,
) -> RowGroups:
    """Group rows by slot (-1: no adapter); ``page_table`` slot -> its pages (n,) (the bank's).
    ``mode``: None (by segment size), "loop" or "padded"."""
    values = torch.as_tensor(row_slots, dtype=torch.long).reshape(-1).tolist()
    groups: dict[int, list[int]] = {}
    for row, slot in enumerate(values):
        if slot >= 0:
            groups.setdefault(slot, []).append(row)
    if mode not in (None, "loop", "padded"):
        raise ValueError(f"mode must be None, 'loop' or 'padded', got {mode!r}")
    missing = [slot for slot in groups if slot not in page_table]
    if missing:
        raise KeyError(f"slots {missing} hold no adapter; load one there first")
    if mode == "loop":
        short = {}
    elif mode == "padded":
        short = groups
    else:
        short = {slot: rows for slot, rows in groups.items() if len(rows) < LOOP_MIN_ROWS}
        short = short if len(short) >= 2 else {}
    looped = tuple(
        _segment(slot, rows, page_table[slot]) for slot, rows in groups.items() if slot not in short
    )
    padded = _padded(short, page_table) if short else None
    return RowGroups(len(values), looped, padded, frozenset(groups), torch.tensor(values))


def _segment(slot: int, rows: list[int], pages: torch.Tensor) -> Segment:
    if rows[-1] - rows[0] == len(rows) - 1:  # ascending and contiguous
        return Segment(slot, slice(rows[0], rows[-1] + 1), pages)
    return Segment(slot, torch.tensor(rows), pages)


def _padded(groups: dict[int, list[int]], page_table: Mapping[int, torch.Tensor]) -> PaddedSegments:
    """The grid of short segments: one entry per page of each segment's slot, its rows padded
    to the longest segment."""
    length = max(len(rows) for rows in groups.values())
    entry_pages, entry_slots, gather, valid, dest = [], [], [], [], []
    for slot, rows in groups.items():
        for page in page_table[slot].tolist():
            start = len(gather)
            entry_pages.append(page)
            entry_slots.append(slot)
            gather += rows + [rows[0]] * (length - len(rows))
            valid += range(start, start + len(rows))
            dest += rows
    no_padding = len(valid) == len(gather)
    return PaddedSegments(
        entry_pages=torch.tensor(entry_pages),
        entry_slots=torch.tensor(entry_slots),
        length=length,
        gather_rows=torch.tensor(gather),
        valid=None if no_padding else torch.tensor(valid),
        dest_rows=torch.tensor(dest),
        slots=frozenset(groups),
    )


def add_lora_looped(
    out: torch.Tensor, x: torch.Tensor, stack: LayerStack, groups: RowGroups
) -> None:
    """``out[rows] += s B A x[rows]`` per looped segment. ``out`` (N, d), ``x`` (N, k), in place;
    A (n*p, k) and B (d, n*p) gathered from the segment's n pages."""
    for segment in groups.looped:
        if segment.slot not in stack.present:
            continue
        slot, rows, pages = segment.slot, segment.rows, segment.pages.to(stack.lora_A.device)
        lora_A = stack.lora_A.index_select(0, pages).flatten(0, 1)  # (n*p, k)
        lora_B = stack.lora_B_t.index_select(0, pages).flatten(0, 1).T  # (d, n*p)
        x_rows = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        delta = functional.lora_forward(x_rows, lora_A, lora_B, stack.scaling_values[slot]).to(
            out.dtype
        )  # (n, d)
        if isinstance(rows, slice):
            out[rows] += delta
        else:
            out.index_add_(0, rows, delta)


def add_lora_padded(
    out: torch.Tensor, x: torch.Tensor, stack: LayerStack, groups: RowGroups
) -> None:
    """All short segments at once: ``out[i] += s[slot] * sum_p B_p (A_p x[i])`` over the pages
    p of row i's slot.

    Shapes: x gathered (E, L, k); A pages (E, p, k); low (E, L, p); B^T pages (E, p, d); delta
    (E, L, d). Rank side first, scale on the rank side (as ``functional.lora_forward``). Pages
    of an adapter that does not adapt this layer hold zeros.
    """
    group = groups.padded
    entries, length = group.entry_pages.numel(), group.length
    x_rows = x.index_select(0, group.gather_rows).to(stack.lora_A.dtype)
    x_rows = x_rows.view(entries, length, x.shape[-1])  # (E, L, k)
    pages = group.entry_pages.to(stack.lora_A.device)
    lora_A = stack.lora_A.index_select(0, pages)  # (E, p, k)
    lora_B_t = stack.lora_B_t.index_select(0, pages)  # (E, p, d)
    scaling = stack.scaling.index_select(0, group.entry_slots.to(stack.scaling.device))
    low = torch.bmm(x_rows, lora_A.transpose(1, 2))  # (E, L, p)
    low = low * scaling.to(low.dtype).view(-1, 1, 1)
    delta = torch.bmm(low, lora_B_t).view(entries * length, -1)  # (E*L, d)
    if group.valid is not None:
        delta = delta.index_select(0, group.valid)  # (M, d)
    out.index_add_(0, group.dest_rows, delta.to(out.dtype))


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
        if self.groups.padded is not None and stack.present & self.groups.padded.slots:
            add_lora_padded(out, flat_x, stack, self.groups)
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
