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
from torch import nn

from lorakit.layers import LoraLinear
from lorakit.serve.bank import AdapterBank
from lorakit.serve.batched import routed
from lorakit.serve.one_adapter import OneAdapterRouter, routed_one
from lorakit.state import adapter_configs, lora_layers

__all__ = [
    "ONE_ROUTERS_KEPT",
    "Routing",
    "bank_of_copies",
    "own_adapter_bank",
    "what_a_bank_leaves_out",
]

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


def own_adapter_bank(model: nn.Module) -> tuple[AdapterBank, str] | None:
    """A one-slot bank holding ``model``'s one active adapter, and its name, when the bank adds
    exactly what the model's own LoRA layers would: every LoRA layer a linear one, one adapter
    active (the same in every layer that has it), none merged, and an adapter of plain LoRA or
    DoRA factors only (no ``lora_bias``, ``modules_to_save``, trainable tokens, bare parameters
    or replicated layers). None otherwise: the model's layers then add their adapters themselves.

    Serving the model's own adapter from a bank lets the lean decode step fuse q/k/v and gate/up
    and add the adapter with one rank-side product per group (``lorakit generate``: one stream
    on SmolLM2-135M int4-groups, 23.3 -> 27.8 tokens/s, the same tokens). The bank copies the
    adapter's factors (its own pages); the model's layers keep theirs.
    """
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        return None
    active = {name for layer in layers for name in layer.chosen_adapters()}
    if len(active) != 1 or any(layer.merged_adapters for layer in layers):
        return None
    (name,) = active
    if what_a_bank_leaves_out(model, name):
        return None
    return bank_of_copies(model, [name]), name


def what_a_bank_leaves_out(model: nn.Module, name: str) -> list[str]:
    """What of adapter ``name`` of ``model`` a serving bank would not add (it holds LoRA / DoRA
    factors of linear layers only): the config fields it ignores that are set (``lora_bias``,
    ``modules_to_save``, ``trainable_token_indices``, ``target_parameters``,
    ``layer_replication``) and the kinds of any non-linear layer holding the adapter. Empty:
    a bank with a copy adds exactly what the model's layers add."""
    config = adapter_configs(model)[name]
    extras = {
        "lora_bias": config.lora_bias,
        "modules_to_save": config.modules_to_save,
        "trainable_token_indices": config.trainable_token_indices,
        "target_parameters": config.target_parameters,
        "layer_replication": config.layer_replication,
    }
    reasons = [field for field, value in extras.items() if value]
    holders = [layer for _, layer in lora_layers(model) if name in layer.ranks]
    if any(not isinstance(layer, LoraLinear) for layer in holders):
        kinds = sorted({type(layer.base_layer).__name__ for layer in holders})
        reasons.append(f"layers of kinds {kinds}")
    return reasons


def bank_of_copies(model: nn.Module, names: list[str]) -> AdapterBank:
    """A bank holding copies of adapters ``names`` of ``model`` (a slot each, in order), in the
    first one's dtype, rank-sized for the largest of them (check ``what_a_bank_leaves_out``
    first)."""
    layers = [layer for _, layer in lora_layers(model)]
    lora_A = next(
        layer.adapter_parameters(names[0])[0] for layer in layers if names[0] in layer.ranks
    )
    max_rank = max(layer.ranks[n] for layer in layers for n in names if n in layer.ranks)
    bank = AdapterBank(model, max_rank=max_rank, capacity=len(names), dtype=lora_A.dtype)
    for name in names:
        bank.load_from_model(name, model, name)
    return bank
