"""How many pages each layer's pool of the adapter bank holds, within a memory budget.

Page numbers are shared by all layers (an adapter holds the same page numbers in every layer it
adapts), but the pools need not all be as long: layer L's pool holds the pages [0, n_L). An
adapter may take pages below the shortest pool of the layers it adapts (its *limit*), and none
in the layers it does not adapt. With ``shares`` (per layer, the part of the adapters' ranks that
adapt it: ``layer_shares``; used when the adapters' sets of layers nest), n_L = share_L x P for
P page numbers, so a bank whose adapters are
half q/v-only and half all-linear gives the MLP pools half the pages of the q/v ones, and the
q/v-only adapters sit in the pages [n_MLP, P) that only the q/v pools have (the bank places
them from the end): the same budget holds more adapters, in proportion to what they adapt.
Without shares every pool has all P pages (every adapter may take any page).

Every pool keeps at least the pages of one adapter of the largest rank, so an adapter added at
runtime that adapts a layer the listed ones rarely do still loads (one such at a time, at worst).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lorakit.io.keys import parse_lora_key

__all__ = ["BudgetTooSmall", "PoolSizes", "layer_shares", "pool_sizes"]


class BudgetTooSmall(ValueError):
    """A ``memory_budget`` (bytes) that holds no adapter of rank ``max_rank``, which takes
    ``adapter_bytes``; its fields let a caller name its own options (the CLI: --adapter-memory,
    --max-rank)."""

    def __init__(self, memory_budget: int, max_rank: int, adapter_bytes: int) -> None:
        self.memory_budget, self.max_rank, self.adapter_bytes = (
            memory_budget,
            max_rank,
            adapter_bytes,
        )
        super().__init__(
            f"memory_budget={memory_budget} bytes holds no adapter of rank {max_rank}: one "
            f"takes {adapter_bytes} bytes; raise memory_budget to at least {adapter_bytes} or "
            "lower max_rank."
        )


@dataclass(frozen=True)
class PoolSizes:
    """``slots`` adapters at most, ``pages`` page numbers, ``lengths[layer]`` pages in each pool."""

    slots: int
    pages: int
    lengths: dict[str, int]


def layer_shares(adapters: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Per layer path: the sum of the ranks of the adapters that adapt it over the sum of all
    their ranks (1.0: every adapter adapts it). ``adapters``: each adapter's tensors by PEFT key
    (tensors or safetensors header entries, anything with a ``shape``); its rank is its largest
    lora_A's row count.

    {} (pools of equal length) unless the adapters' sets of layers nest (q/v only inside
    all-linear, say): adapters of crossing sets (q/v and MLP-only) would all be confined to the
    shortest pool of their layers, and the longer pools would hold pages none of them can use.
    """
    total, covered, layer_sets = 0.0, {}, set()
    for tensors in adapters:
        paths, rank = set(), 0
        for key, tensor in tensors.items():
            parsed = parse_lora_key(key, embeddings=False)
            if parsed is not None and parsed[1] == "lora_A":
                paths.add(parsed[0])
                rank = max(rank, int(tensor.shape[0]))
        total += rank
        layer_sets.add(frozenset(paths))
        for path in paths:
            covered[path] = covered.get(path, 0.0) + rank
    chain = sorted(layer_sets, key=len)
    if not total or any(not small <= large for small, large in itertools.pairwise(chain)):
        return {}
    return {path: weight / total for path, weight in covered.items()}


def pool_sizes(
    page_bytes: Mapping[str, int],
    *,
    max_rank: int,
    per_adapter: int,
    slot_overhead: int,
    capacity: int | None,
    memory_budget: int | None,
    shares: Mapping[str, float] | None = None,
) -> PoolSizes:
    """The slots, page numbers and pool lengths: ``page_bytes[layer]`` a page's bytes in that
    layer's pool, ``per_adapter`` the pages of an adapter of the largest rank ``max_rank``,
    ``slot_overhead`` a slot's bytes. Without ``memory_budget``: ``capacity`` adapters of the
    largest rank fit, in every pool (``shares`` size pools only within a budget). With it: as
    many page numbers as fit ``sum_L n_L page_bytes[L] + slots x slot_overhead`` within the
    budget, each pool ``n_L`` = its share of them (at least one adapter's); slots: as many as
    the budget's bytes allow at one page each, at most ``capacity``, and at most as many as
    leave room for one adapter of the largest rank in every pool (``_slots_cap``); page numbers:
    at most ``slots x per_adapter``, which is all that ``slots`` adapters can use. Slots: never
    more than the page numbers (an adapter holds at least one), so ``slots <= pages <= slots x
    per_adapter``: equal at roomy budgets, fewer slots at tight ones (one slot and
    ``per_adapter`` pages at the least budget).
    ``BudgetTooSmall`` (a ``ValueError``) when no adapter of the largest rank fits, i.e. the
    budget is under ``per_adapter x sum(page_bytes) + slot_overhead`` (one slot and one such
    adapter's pages in every pool): the minimum it states, which is exactly enough."""
    if shares is not None and not any(shares.get(name, 0.0) > 0 for name in page_bytes):
        shares = None  # no share for any of these layers: nothing to size the pools by
    weight = {
        name: 1.0 if shares is None else min(1.0, max(0.0, shares.get(name, 0.0)))
        for name in page_bytes
    }

    def lengths(pages: int) -> dict[str, int]:
        floor = min(per_adapter, pages)
        return {name: max(floor, math.floor(weight[name] * pages)) for name in page_bytes}

    if memory_budget is None:
        if capacity is None or capacity < 1:
            raise ValueError(f"give a capacity >= 1 or a memory_budget (got capacity={capacity})")
        pages = capacity * per_adapter
        return PoolSizes(capacity, pages, dict.fromkeys(page_bytes, pages))
    mean_page = sum(weight[name] * size for name, size in page_bytes.items())
    estimate = int(memory_budget // (mean_page + slot_overhead))
    estimate = min(estimate, _slots_cap(page_bytes, per_adapter, slot_overhead, memory_budget))
    slots = estimate if capacity is None else min(capacity, estimate)

    def pool_bytes(pages: int) -> int:
        return sum(n * page_bytes[name] for name, n in lengths(pages).items())

    def pages_within(slots: int) -> int:
        """The most page numbers that ``slots`` slots leave room for and can use."""
        pages = int((memory_budget - slots * slot_overhead) // mean_page)
        pages = min(pages, slots * per_adapter)  # more page numbers than slots can use: none
        while pages > 0 and pool_bytes(pages) + slots * slot_overhead > memory_budget:
            pages -= 1  # the floor of one adapter per pool can push a tight budget over
        return pages

    pages = pages_within(slots)
    if 0 < pages < slots:  # every adapter holds a page: slots past the pages are never used
        slots = pages  # (review 38: 6 slots on 4 pages); their bytes may buy pages back
        pages = pages_within(slots)
    if slots < 1 or pages < per_adapter:
        one = per_adapter * sum(page_bytes.values()) + slot_overhead
        raise BudgetTooSmall(memory_budget, max_rank, one)
    return PoolSizes(slots, pages, lengths(pages))


def _slots_cap(
    page_bytes: Mapping[str, int], per_adapter: int, slot_overhead: int, memory_budget: int
) -> int:
    """The most slots that leave room for one adapter of the largest rank in every pool:
    ``(memory_budget - per_adapter x sum(page_bytes)) // slot_overhead`` (no bound when a slot
    costs nothing). Every pool holds at least ``per_adapter`` pages, which cost
    ``per_adapter x sum(page_bytes)`` together, so more slots than this leave too few bytes for
    the pages and the bank would be refused; the slot estimate at one (mean) page per slot gave
    a tight budget such slots (a budget of exactly the stated minimum was refused: review 31)."""
    if slot_overhead <= 0:
        return int(memory_budget)  # (as many as any estimate: slots cost nothing)
    pages_bytes = per_adapter * sum(page_bytes.values())
    return max(0, int((memory_budget - pages_bytes) // slot_overhead))
