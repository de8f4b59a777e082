"""Whether a Ray replica's adapter bank holds more than the adapters it pins
(``serve.ray_deployment``): each replica pins its multiplexed cache of ``adapters_per_replica``
adapters in its bank, and Ray unpins one only when that cache is full, so a bank with no slot,
or with ``--adapter-memory`` no pages, beyond them answers every other adapter 503 for good.
``check_bank_size`` counts slots (``--max-adapters``); ``check_bank_memory`` sizes the bank a
replica would allocate (the model on the meta device, the adapters' headers) and counts the
adapters of the largest rank it holds at once, per layer pool; ``check_replica_bank`` does the
same on a replica's real bank where the driver cannot read the files.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from lorakit.errors import UserError, first_line
from lorakit.serve.pool_sizes import BudgetTooSmall, PoolSizes, pool_sizes

__all__ = ["BankTooSmallError", "check_bank_memory", "check_bank_size", "check_replica_bank"]

log = logging.getLogger("lorakit.serve.ray_deployment")


class BankTooSmallError(UserError, ValueError):
    """``--max-adapters`` leaves a replica's bank no slot beyond its pinned multiplexed cache,
    or ``--adapter-memory`` no pages for one more adapter of the largest rank."""


def check_bank_size(max_adapters: int, adapters_per_replica: int) -> None:
    """Refuse a bank of ``max_adapters`` slots that the ``adapters_per_replica`` pinned
    multiplexed adapters would fill: adapters beyond them would never get a slot (503 for
    ever), since Ray unpins one only when its own cache, of ``adapters_per_replica``, is full."""
    if max_adapters < 1:
        raise BankTooSmallError(f"--max-adapters must be >= 1, got {max_adapters}")
    if max_adapters < adapters_per_replica + 1:
        lower = (
            f", or lower adapters_per_replica to {max_adapters - 1} at most"
            if max_adapters >= 2
            else ""
        )
        raise BankTooSmallError(
            f"--max-adapters {max_adapters} leaves no bank slot beyond the "
            f"adapters_per_replica={adapters_per_replica} adapters each replica pins: set "
            f"--max-adapters to at least {adapters_per_replica + 1} (leave it out for "
            f"{adapters_per_replica + 2}){lower}"
        )


def check_bank_memory(options: argparse.Namespace, adapters_per_replica: int) -> None:
    """Refuse an ``--adapter-memory`` whose bank holds no more adapters of the largest rank at
    once than the ``adapters_per_replica`` each replica pins (``_require_room_beyond_pins``):
    an adapter beyond them waits for pages that only Ray's eviction from its multiplexed cache
    would free, and Ray evicts only when that cache is full, so it was answered 503 for ever.
    The bank is sized as a replica sizes it (``_meta_bank_shape``: the model's config on the
    meta device, the adapters' headers); where this process cannot read them (a cluster whose
    files only the workers have), each replica checks its own bank as it starts
    (``check_replica_bank``)."""
    from lorakit.commands._serve_options import check_numbers

    check_numbers(options)  # (a size that is not one, or under a byte, as lorakit serve says)
    shape = _meta_bank_shape(options)
    if shape is not None:
        _require_room_beyond_pins(shape, options, adapters_per_replica)


def check_replica_bank(adapters, options: argparse.Namespace, adapters_per_replica: int) -> None:
    """``_require_room_beyond_pins`` for a replica's own bank (``adapters``: the app's
    ``ServedAdapters``), with the layer shares of the adapters it serves."""
    from lorakit.serve.pool_sizes import layer_shares

    shares = layer_shares(header.tensors for header in adapters.registry.read_headers().values())
    _require_room_beyond_pins(_BankShape.of(adapters.bank, shares), options, adapters_per_replica)


@dataclass(frozen=True)
class _BankShape:
    """What sizes a replica's bank: ``pool_sizes``'s inputs as ``AdapterBank`` gives them
    (``page_bytes``: a page's bytes in each layer's pool; ``per_adapter``: the pages of an
    adapter of ``max_rank``; a slot's bytes), and the layer shares of the served adapters."""

    page_bytes: dict[str, int]
    max_rank: int
    per_adapter: int
    slot_overhead: int
    shares: dict[str, float]

    @classmethod
    def of(cls, bank, shares: dict[str, float]) -> _BankShape:
        return cls(
            dict(bank._layer_page_bytes),
            bank.max_rank,
            bank.pages_for(bank.max_rank),
            bank.slot_overhead,
            dict(shares),
        )

    def held(self, capacity: int | None, budget: int) -> int:
        """Adapters of ``max_rank`` that a bank of ``capacity`` slots within ``budget`` bytes
        holds at once, whichever of the served adapters they are: ``min(slots, limit //
        per_adapter)``, ``limit`` the shortest pool of the layers the adapters adapt (with
        layer shares, the widest adapter's: the pools of layers fewer adapters adapt are
        shorter; without them every pool has all the pages). 0: it holds none."""
        try:
            sizes = pool_sizes(
                self.page_bytes,
                max_rank=self.max_rank,
                per_adapter=self.per_adapter,
                slot_overhead=self.slot_overhead,
                capacity=capacity,
                memory_budget=budget,
                shares=self.shares,
            )
        except BudgetTooSmall:
            return 0
        return _held_at_once(sizes, self.per_adapter, self.shares)

    def least_budget(self, capacity: int | None, count: int) -> int | None:
        """The least budget (bytes) in which ``held(capacity, budget) >= count``: doubled
        until it is, then bisected. None when no budget is (the layer shares keep the pools
        of the widest adapter's layers below ``count`` adapters' pages of ``capacity``'s)."""
        high = max(1, self.per_adapter * sum(self.page_bytes.values()))
        while self.held(capacity, high) < count:
            if high > _MOST_BYTES:
                return None
            high *= 2
        low = 0  # held(capacity, low) < count <= held(capacity, high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self.held(capacity, middle) >= count else (middle, high)
        return high

    def least_capacity(self, capacity: int, count: int) -> int | None:
        """The fewest slots (``--max-adapters``, from ``capacity`` up) whose bank holds
        ``count`` adapters at once in some budget; None past ``_MOST_SLOTS``."""
        high = capacity
        while self.held(high, _MOST_BYTES) < count:
            if high > _MOST_SLOTS:
                return None
            high *= 2
        low = capacity - 1  # held(low, ...) < count <= held(high, ...)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self.held(middle, _MOST_BYTES) >= count else (middle, high)
        return high


_MOST_BYTES = 1 << 50  # budgets searched up to this (1 PiB)
_MOST_SLOTS = 1 << 20  # --max-adapters searched up to this


def _held_at_once(sizes: PoolSizes, per_adapter: int, shares: dict[str, float]) -> int:
    """``_BankShape.held`` for pools of ``sizes``."""
    limit = min((sizes.lengths[name] for name in shares if name in sizes.lengths), default=None)
    return min(sizes.slots, (sizes.pages if limit is None else limit) // per_adapter)


def _require_room_beyond_pins(
    shape: _BankShape, options: argparse.Namespace, adapters_per_replica: int
) -> None:
    """``BankTooSmallError`` unless the bank of ``options`` (``--adapter-memory``,
    ``--max-adapters``) holds more than ``adapters_per_replica`` adapters of the largest rank
    at once, naming both numbers and what to raise (the least budget that holds one more, or
    the slots and budget when the layer shares need more slots) or lower."""
    from lorakit.commands._serve_options import parse_size

    capacity, wanted = options.max_adapters, adapters_per_replica + 1
    held = shape.held(capacity, parse_size(options.adapter_memory))
    if held >= wanted:
        return
    lower = f", or lower adapters_per_replica to {held - 1} at most" if held >= 2 else ""
    raise BankTooSmallError(
        f"--adapter-memory {options.adapter_memory} holds {held} adapter(s) of rank "
        f"{shape.max_rank} at once in a replica's bank, not more than the "
        f"adapters_per_replica={adapters_per_replica} each replica pins there: any other "
        f"adapter would wait for pages that are never freed (503 for ever); "
        f"{_bank_that_holds(shape, capacity, wanted)}{lower}"
    )


def _bank_that_holds(shape: _BankShape, capacity: int | None, wanted: int) -> str:
    """What to set for a bank that holds ``wanted`` adapters of the largest rank at once: the
    least ``--adapter-memory`` with these ``capacity`` slots or, when the layer shares keep
    every budget of them short, the fewest slots and their least budget."""
    budget = shape.least_budget(capacity, wanted)
    if budget is not None:
        return f"raise --adapter-memory to at least {budget} bytes"
    slots = None if capacity is None else shape.least_capacity(capacity, wanted)
    budget = None if slots is None else shape.least_budget(slots, wanted)
    settings = (
        "raise --max-adapters and --adapter-memory"
        if budget is None
        else f"set --max-adapters to {slots} and --adapter-memory to at least {budget} bytes"
    )
    return (
        f"{settings} (the pools of the layers only some adapters adapt hold their share of "
        f"the --max-adapters x {shape.per_adapter} pages)"
    )


def _meta_bank_shape(options: argparse.Namespace) -> _BankShape | None:
    """The ``_BankShape`` of the bank a replica allocates for ``options``, as ``lorakit
    serve``'s ``build`` makes it (the targets, largest rank and layer shares of the adapters'
    headers: ``commands.serve._adapter_defaults``; ``--target-modules``, ``--max-rank``,
    ``--adapter-dtype``), around the model built on the meta device (its config only, no
    weights; a quantized base's bank is float32, as its ``base_float_dtype`` says). None, with
    a warning, when the model or the adapters cannot be read or built here."""
    from lorakit.commands._model_options import torch_dtype
    from lorakit.commands.serve import _adapter_defaults
    from lorakit.meta_model import build_meta_model
    from lorakit.serve import AdapterBank, prepare_for_serving
    from lorakit.serve.registry import AdapterRegistry

    try:
        targets, max_rank, shares = _adapter_defaults(AdapterRegistry(options.adapters))
        dtype = "float32" if options.quantization else options.dtype
        model, _ = build_meta_model(options.model, dtype)
    except Exception as error:  # (not there, or not built on meta: the replicas' check stands)
        log.warning(
            "build_app: --adapter-memory %s is checked by each replica as it starts, not here: %s",
            options.adapter_memory,
            first_line(error, 300),
        )
        return None
    if options.target_modules:
        targets = [t.strip() for t in options.target_modules.split(",") if t.strip()]
    try:
        prepare_for_serving(model, targets)
    except (ValueError, TypeError) as error:  # (as build says it)
        raise UserError(f"--target-modules: {error}") from None
    adapter_dtype = None if options.adapter_dtype is None else torch_dtype(options.adapter_dtype)
    try:  # one slot, no budget: the sizes of a page and a slot, whatever the budget
        bank = AdapterBank(
            model, max_rank=options.max_rank or max_rank, capacity=1, dtype=adapter_dtype
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    return _BankShape.of(bank, shares)
