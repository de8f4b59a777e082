"""Routing a forward whose every token takes the same adapter (one stream, a lone prefill).

Semantics: ``y = base(x) + s B A x`` for all rows of ``x`` (N, k), with A (r, k) and B (d, r)
the slot's adapter in the bank, which is the batched op (``batched.routed``) with one segment.
What it saves per layer: the grouping, the per-row index copies and, when the slot's pages are
a run of consecutive page numbers (in any order: a bank fills and refills its free pages in
runs, so they are unless evictions fragmented it), the gather of its pages: A (n*p, k) and
B^T (n*p, d) are then views of the pools. Scattered pages are gathered once per layer
(``index_select``), as the batched op does.

A DoRA slot (its gain scales the base output) takes the batched op's path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import functional
from lorakit.layers import row_router
from lorakit.serve.bank import AdapterBank
from lorakit.serve.batched import BankRouter, group_rows
from lorakit.serve.stacks import LayerStack

__all__ = ["OneAdapterRouter", "page_range", "routed_one"]


def page_range(pages: torch.Tensor) -> slice | None:
    """The slice of the pools that holds exactly ``pages`` (n,) (distinct page numbers) when
    they are n consecutive numbers in any order, else None. The order does not matter: B A x is
    the sum over the pages of B_p A_p x, and A and B are sliced alike."""
    first, last = int(pages.min()), int(pages.max())
    return slice(first, last + 1) if last - first == pages.numel() - 1 else None


class OneAdapterRouter:
    """The ``row_router`` callable when every row takes adapter slot ``slot`` of ``bank``.

    It keeps each layer's factors (views of the pools, or the gathered pages) for as long as the
    slot keeps the same pages (``is_current``): the engine reuses it from one decode step to the
    next.
    """

    def __init__(self, bank: AdapterBank, slot: int) -> None:
        if slot not in bank.page_table:
            raise KeyError(f"slot {slot} holds no adapter; load one there first")
        self.bank = bank
        self.slot = slot
        self.pages = bank.page_table[slot]
        self.page_range = page_range(self.pages)
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._siblings: dict[tuple[int, ...], _SiblingFactors] = {}
        self._general: BankRouter | None = None

    def is_current(self) -> bool:
        """True while the slot holds the adapter (the very page table) this router was made for."""
        return self.bank.page_table.get(self.slot) is self.pages

    def factors(self, stack: LayerStack) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's A (n*p, k) and B^T (n*p, d) in ``stack``, in ``stack.compute_dtype``:
        views of the pools when its pages are a run, else gathered copies; 16-bit pools' pages
        widened to float32 copies (kept while the pools are the same tensors)."""
        cached = self._factors.get(id(stack))
        if cached is not None and cached[0] is stack.lora_A:
            return cached[1], cached[2]
        if self.page_range is not None:
            lora_A = stack.lora_A[self.page_range]  # (n, p, k)
            lora_B_t = stack.lora_B_t[self.page_range]  # (n, p, d)
        else:
            pages = self.pages.to(stack.lora_A.device)
            lora_A = stack.lora_A.index_select(0, pages)
            lora_B_t = stack.lora_B_t.index_select(0, pages)
        lora_A = lora_A.flatten(0, 1).to(stack.compute_dtype)
        lora_B_t = lora_B_t.flatten(0, 1).to(stack.compute_dtype)
        self._factors[id(stack)] = (stack.lora_A, lora_A, lora_B_t)
        return lora_A, lora_B_t

    def __call__(
        self, layer: torch.nn.Module, x: torch.Tensor, base_output: torch.Tensor
    ) -> torch.Tensor:
        stack = self.bank.stack_for(layer)
        if stack is None or self.slot not in stack.present:
            return base_output  # a layer this adapter does not touch (or not routed)
        if self.slot in stack.dora_slots:
            return self._general_router(x)(layer, x, base_output)
        lora_A, lora_B_t = self.factors(stack)
        scale = stack.scaling_values[self.slot]
        rows = x.shape[:-1].numel()
        out = base_output.view(rows, base_output.shape[-1])  # shares storage: in-place adds
        flat_x = x.reshape(rows, x.shape[-1])
        if flat_x.dtype == lora_A.dtype == out.dtype:
            functional.add_lora_forward_(out, flat_x, lora_A, lora_B_t, scale)
        else:  # a float32 or 16-bit bank beside a 16-bit base: in float32, as the batched op
            wide_x = flat_x.to(lora_A.dtype)
            out += functional.lora_forward(wide_x, lora_A, lora_B_t.T, scale).to(out.dtype)
        return base_output

    def add_siblings(
        self, layers: Sequence[nn.Module], widths: Sequence[int], x: torch.Tensor, out: torch.Tensor
    ) -> bool:
        """``out[:, part i] += s_i B_i A_i x`` for every layer i of ``layers`` that this slot
        adapts (siblings that read ``x`` (..., k), whose base outputs, ``widths`` d_i wide, lie
        side by side in ``out`` (..., sum d_i)): one product ``low = x [s_1 A_1; ..; s_n A_n]^T``
        (N, R) for all of them (the scaled A's are concatenated once and kept), then
        ``low_i B_i^T`` added to each part. In the bank's ``compute_dtype`` (beside a bfloat16
        base: x is cast up once, each part's product rounded to ``out``'s dtype, as
        the per-layer call does). Returns False, having added nothing, where the siblings need
        the per-layer call (a DoRA slot); ``lorakit.serve.siblings`` then calls the router per
        layer.
        """
        key = tuple(map(id, layers))
        entry = self._siblings.get(key)
        if entry is None or not entry.current():
            entry = self._siblings[key] = self._sibling_factors(layers, widths)
        if entry.lora_A_t is None:
            return False
        if not entry.parts:
            return True  # no sibling is adapted by this slot
        if x.dim() == 2:  # (N, k) already (the lean decode step): no views
            flat_x, flat_out = x, out
        else:
            rows = x.shape[:-1].numel()
            flat_x, flat_out = x.reshape(rows, x.shape[-1]), out.view(rows, out.shape[-1])
        if flat_x.dtype != entry.lora_A_t.dtype:
            flat_x = flat_x.to(entry.lora_A_t.dtype)
        low = torch.mm(flat_x, entry.lora_A_t)  # (N, R): F.linear's own product
        # each part's view by one split (not an op per part), none for a lone part
        outs = flat_out.split_with_sizes(widths, -1) if len(widths) > 1 else (flat_out,)
        lows = low.split_with_sizes(entry.ranks, -1) if len(entry.ranks) > 1 else (low,)
        for (member, lora_B_t), low_i in zip(entry.parts, lows, strict=True):
            if out.dtype == lora_B_t.dtype:
                outs[member].addmm_(low_i, lora_B_t)  # (N, d_i)
            else:
                outs[member].add_((low_i @ lora_B_t).to(out.dtype))
        return True

    def _sibling_factors(
        self, layers: Sequence[nn.Module], widths: Sequence[int]
    ) -> _SiblingFactors:
        stacks, lora_As, parts, ranks = [], [], [], []
        for member, layer in enumerate(layers):
            stack = self.bank.stack_for(layer)
            if stack is not None and self.slot in stack.present:
                if self.slot in stack.dora_slots:
                    return _SiblingFactors(None, [], [], [], [])  # declined (a slot stays DoRA)
                lora_A, lora_B_t = self.factors(stack)
                stacks.append(stack)
                lora_As.append(lora_A * stack.scaling_values[self.slot])
                parts.append((member, lora_B_t))
                ranks.append(lora_A.shape[0])
        if not lora_As:
            empty = torch.zeros(0, 0, dtype=self.bank.compute_dtype)
            return _SiblingFactors(empty.T, [], [], [], [])
        pools = [stack.lora_A for stack in stacks]
        return _SiblingFactors(torch.cat(lora_As).T, parts, ranks, stacks, pools)

    def _general_router(self, x: torch.Tensor) -> BankRouter:
        rows = x.shape[:-1].numel()
        if self._general is None or self._general.groups.num_rows != rows:
            groups = group_rows([self.slot] * rows, self.bank.page_table)
            self._general = BankRouter(self.bank, groups)
        return self._general


@dataclass
class _SiblingFactors:
    """Siblings' adapters of one slot: the scaled A's concatenated (R, k), held as its
    transposed view (k, R) (None: the slot is DoRA, the siblings take the per-layer call), and per adapted sibling (its index among the
    siblings, its B^T (r_i, d_i)) with its rank r_i (``ranks``: its columns of ``low``); kept
    while ``stacks`` hold the same ``pools``."""

    lora_A_t: torch.Tensor | None
    parts: list[tuple[int, torch.Tensor]]
    ranks: list[int]
    stacks: list[LayerStack]
    pools: list[torch.Tensor]

    def current(self) -> bool:
        for stack, pool in zip(self.stacks, self.pools, strict=True):
            if stack.lora_A is not pool:
                return False
        return True


@contextmanager
def routed_one(router: OneAdapterRouter) -> Iterator[OneAdapterRouter]:
    """Within the block every forward of the bank's model adds ``router``'s adapter to every
    token (what ``batched.routed(bank, token_slots)`` does when all ``token_slots`` are its slot):
    ``with routed_one(OneAdapterRouter(bank, slot)): model(ids)``."""
    with torch.no_grad(), row_router(router):
        yield router
