"""The batched multi-adapter op: every row of a batch adds its own adapter's low-rank output.

Semantics (punica's BGMV / SGMV), for rows ``i`` of ``x`` (N, k) and slots ``slot[i]``::

    y[i] = base(x)[i] + s[slot[i]] * B[slot[i]] A[slot[i]] x[i]       (slot[i] = -1: y[i] = base(x)[i])

with the bank's stacks A (slots, r_max, k), B (slots, d, r_max), s (slots,). The rows are grouped
once per forward (``plan_rows``) and the plan is reused by every layer of that forward:

- segments (SGMV): rows of equal slot form a segment (a slice when contiguous, else an index);
  one pair of small matmuls per segment, through ``functional.lora_forward``;
- gathered (BGMV): when segments are many and short (decode with many adapters), each row's
  A and B are gathered and two batched matmuls do all rows at once.

Results are added into the base layer's output in place (inference only, no autograd).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lorakit import functional
from lorakit.layers import row_router
from lorakit.serve.bank import AdapterBank, LayerStack

__all__ = [
    "BankRouter",
    "RowPlan",
    "Segment",
    "add_lora_gathered",
    "add_lora_segments",
    "plan_rows",
    "routed",
]

# Gather (BGMV) when there are more segments than this and they average fewer rows than this.
GATHER_MIN_SEGMENTS = 4
GATHER_MAX_MEAN_ROWS = 8


@dataclass(frozen=True)
class Segment:
    """Rows sharing one adapter slot: a ``slice`` when contiguous, else a LongTensor of rows."""

    slot: int
    rows: slice | torch.Tensor


@dataclass(frozen=True)
class RowPlan:
    """How the N rows of one forward map to adapter slots (built once, used by every layer)."""

    num_rows: int
    segments: tuple[Segment, ...]
    slots: frozenset[int]
    gather_rows: torch.Tensor | None = None  # (M,) rows with an adapter, for the gathered path
    gather_slots: torch.Tensor | None = None  # (M,) their slots


def plan_rows(row_slots: torch.Tensor | Sequence[int], gather: bool | None = None) -> RowPlan:
    """Group rows by slot (-1: no adapter). ``gather``: force (True) or forbid (False) BGMV."""
    slots = torch.as_tensor(row_slots, dtype=torch.long).reshape(-1)
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    values, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    segments, start = [], 0
    for slot, count in zip(values.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        start += count
        if slot < 0:
            continue
        first = int(rows[0])
        contiguous = int(rows[-1]) - first == count - 1
        segments.append(Segment(slot, slice(first, first + count) if contiguous else rows))
    with_adapter = int((slots >= 0).sum())
    if gather is None:
        gather = len(segments) > GATHER_MIN_SEGMENTS and with_adapter < GATHER_MAX_MEAN_ROWS * len(
            segments
        )
    gather_rows = gather_slots = None
    if gather and segments:
        gather_rows = torch.nonzero(slots >= 0).reshape(-1)
        gather_slots = slots[gather_rows]
    slot_set = frozenset(segment.slot for segment in segments)
    return RowPlan(slots.numel(), tuple(segments), slot_set, gather_rows, gather_slots)


def add_lora_segments(out: torch.Tensor, x: torch.Tensor, stack: LayerStack, plan: RowPlan) -> None:
    """SGMV: ``out[rows] += s B A x[rows]`` per segment. ``out`` (N, d), ``x`` (N, k), in place."""
    for segment in plan.segments:
        if segment.slot not in stack.present:
            continue
        slot, rows = segment.slot, segment.rows
        x_rows = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        delta = functional.lora_forward(
            x_rows, stack.lora_A[slot], stack.lora_B[slot], float(stack.scaling[slot])
        ).to(out.dtype)  # (n, d)
        if isinstance(rows, slice):
            out[rows] += delta
        else:
            out.index_add_(0, rows, delta)


def add_lora_gathered(out: torch.Tensor, x: torch.Tensor, stack: LayerStack, plan: RowPlan) -> None:
    """BGMV: ``out[i] += s[slot_i] * B[slot_i] (A[slot_i] x[i])`` for all rows at once.

    Shapes: gathered A (M, r, k), B (M, d, r); rank side first, scale applied on the rank side
    (as ``functional.lora_forward``). Slots without an adapter on this layer are zeros.
    """
    rows, slots = plan.gather_rows, plan.gather_slots
    x_rows = x.index_select(0, rows).to(stack.lora_A.dtype).unsqueeze(-1)  # (M, k, 1)
    low = torch.bmm(stack.lora_A.index_select(0, slots), x_rows)  # (M, r, 1)
    low = low * stack.scaling.index_select(0, slots).to(low.dtype).view(-1, 1, 1)
    delta = torch.bmm(stack.lora_B.index_select(0, slots), low).squeeze(-1)  # (M, d)
    out.index_add_(0, rows, delta.to(out.dtype))


class BankRouter:
    """The ``row_router`` callable: each LoRA layer's rows get their slot's adapter from the bank."""

    def __init__(self, bank: AdapterBank, plan: RowPlan) -> None:
        self.bank = bank
        self.plan = plan

    def __call__(
        self, layer: torch.nn.Module, x: torch.Tensor, base_output: torch.Tensor
    ) -> torch.Tensor:
        stack = self.bank.stack_for(layer)
        if stack is None or not (stack.present & self.plan.slots):
            return base_output  # a layer no adapter of this batch touches (or not routed)
        rows = x.shape[:-1].numel()
        if rows != self.plan.num_rows:
            raise ValueError(
                f"layer {stack.name!r} got {rows} rows but the plan has {self.plan.num_rows} "
                "slots; give one slot per token (batch * sequence)."
            )
        out = base_output.view(rows, base_output.shape[-1])  # shares storage: in-place adds
        flat_x = x.reshape(rows, x.shape[-1])
        if self.plan.gather_rows is not None:
            add_lora_gathered(out, flat_x, stack, self.plan)
        else:
            add_lora_segments(out, flat_x, stack, self.plan)
        return base_output


@contextmanager
def routed(
    bank: AdapterBank, token_slots: torch.Tensor | Sequence[int], gather: bool | None = None
) -> Iterator[RowPlan]:
    """Within the block, every forward of the bank's model adds each token's adapter.

    ``token_slots``: one slot per token, shaped like ``input_ids`` (B, T) or flat (B*T,);
    a per-sequence choice (B,) is expanded with ``token_slots[:, None].expand(B, T)`` by the caller.
    """
    plan = plan_rows(token_slots, gather=gather)
    with torch.no_grad(), row_router(BankRouter(bank, plan)):
        yield plan
