"""Which adapter routing a forward of the engine takes, and the one-adapter routers it keeps.

Rows with adapter slots ``row_slots`` (one per request, -1: no adapter), ``tokens`` tokens each:

- every row on the same adapter (one stream, every prefill): ``one_adapter.routed_one`` with
  that slot's ``OneAdapterRouter``, kept from step to step while the slot keeps its pages (the
  ``ONE_ROUTERS_KEPT`` most recently used: each may hold its adapter's scaled A factors for the
  lean step's sibling products, about half the adapter's bytes);
- otherwise the batched op, ``batched.routed``, one slot per token;
- without a bank, the model as it is (its own active adapters).
"""

from __future__ import annotations

import collections
import contextlib

import torch

from lorakit.serve.bank import AdapterBank
from lorakit.serve.batched import routed
from lorakit.serve.one_adapter import OneAdapterRouter, routed_one

__all__ = ["ONE_ROUTERS_KEPT", "Routing"]

ONE_ROUTERS_KEPT = 4


class Routing:
    """``routing(row_slots, tokens)``: the context a forward of those rows runs in."""

    def __init__(self, bank: AdapterBank | None) -> None:
        self.bank = bank
        # slot -> its one-adapter router, least recently used first
        self.one_routers: collections.OrderedDict[int, OneAdapterRouter] = collections.OrderedDict()

    def __call__(self, row_slots: list[int], tokens: int):
        if self.bank is None:
            return contextlib.nullcontext()
        first = row_slots[0]
        if first >= 0 and row_slots.count(first) == len(row_slots):
            return routed_one(self._one_router(first))
        slots = torch.tensor(row_slots)[:, None].expand(len(row_slots), tokens)
        return routed(self.bank, slots)

    def _one_router(self, slot: int) -> OneAdapterRouter:
        router = self.one_routers.get(slot)
        if router is None or not router.is_current():  # (kept while the slot's pages are)
            router = self.one_routers[slot] = OneAdapterRouter(self.bank, slot)
        self.one_routers.move_to_end(slot)
        if len(self.one_routers) > ONE_ROUTERS_KEPT:
            self.one_routers.popitem(last=False)
        return router
