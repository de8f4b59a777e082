"""``AdapterBank``: the LoRA adapters of one base model held apart from it, stacked by slot.

Each adapted linear layer has its page pools (``lorakit.serve.stacks``: A (pages, page_rank, k),
B^T (pages, page_rank, d)) and scalings (slots,); an adapter of rank r holds a slot and
``ceil(r / page_rank)`` pages, the same page numbers in every layer it adapts (one aligned run
where it can, ``lorakit.serve.pages``, so the batched op reads them in place), so the bank's memory
goes to the ranks actually held: a thousand rank-4 adapters take a sixteenth of the pages of
rank-64 ones. Pools may differ in length (``layer_shares``, ``lorakit.serve.pool_sizes``): layers
fewer adapters adapt (the MLP, when half of them are q/v-only) hold fewer pages. The model
itself needs LoRA layers around the targets but no adapters of its own:
``prepare_for_serving(model, target_modules)`` wraps them empty. Loading and eviction are allowed
while serving: slots in use by a running request (``acquire``/``release``) or pinned are never
evicted; otherwise the least recently used adapter makes room. All methods are thread-safe;
lazy loads (``acquire`` / ``ensure_loaded`` with a loader) read files outside the lock, and every
load checks the tensors and resolves the config's patterns (``prepare``) outside it too: under
the lock only the slot is written. One lazy load per adapter at a time: callers that want an
adapter another thread is reading wait for that load (its slot, or its error) instead of
reading the files again, whichever path they come from (the HTTP handlers' ``ensure_loaded``,
the engine's cold loads' ``acquire``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layer_wrapping import default_adapter_dtype
from lorakit.layers import LoraLinear
from lorakit.serve.bank_holds import BankHolds
from lorakit.serve.checks import PreparedAdapter, lora_pairs, prepare_adapter
from lorakit.serve.lazy_loads import LazyLoads
from lorakit.serve.pool_sizes import PoolSizes, pool_sizes
from lorakit.serve.residency import AdapterInUseError, BankFullError, Residency
from lorakit.serve.stacks import (
    LayerStack,
    allocate_stack,
    page_bytes,
    prepare_for_serving,
    product_dtype,
    write_slot,
)
from lorakit.state import adapter_configs, lora_layers

__all__ = [
    "AdapterBank",
    "AdapterInUseError",
    "BankFullError",
    "LayerStack",
    "PreparedAdapter",
    "prepare_for_serving",
]


class AdapterBank(BankHolds, LazyLoads):
    """Adapters by name -> slot and pages, their tensors paged per layer (see the module
    docstring); holds, pins and evictions in ``bank_holds``, loads while serving in ``lazy_loads``.

    ``capacity``: adapters resident at most (slots). ``memory_budget``: bytes of the page pools
    and scalings, which never exceed it; the DoRA gain tables (``(slots + 1) x d`` per layer,
    made at the first DoRA adapter) come on top, outside the budget, and ``memory_bytes()``
    counts them, so with a DoRA adapter loaded it may exceed the budget. Without a budget,
    ``capacity`` adapters of rank ``max_rank`` fit. ``max_rank``: the largest rank accepted.
    ``page_rank``: rows per page (default: 4, or ``max_rank`` if smaller); an adapter's rank is
    rounded up to it.
    ``dtype``: of the pools (default: ``lorakit.layer_wrapping.default_adapter_dtype``, as for an
    injected adapter: the base weights' dtype, float32 for half-precision bases). The products
    run in ``compute_dtype`` (``stacks.product_dtype``: float32, float64 for float64 pools): a
    bfloat16 or float16 bank holds twice the adapters of a float32 one in the same budget, its
    adapters rounded once when they are written, and widens the pages it reads per product.
    ``layer_shares``: per layer path, the part of the adapters' ranks that adapt it
    (``pool_sizes.layer_shares`` of the adapters to serve): each layer's pool holds that part of
    the page numbers (``serve/pool_sizes.py``); None: every pool holds all of them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_rank: int = 16,
        capacity: int | None = None,
        memory_budget: int | None = None,
        dtype: torch.dtype | None = None,
        page_rank: int | None = None,
        layer_shares: Mapping[str, float] | None = None,
    ) -> None:
        linears = [(n, layer) for n, layer in lora_layers(model) if isinstance(layer, LoraLinear)]
        if not linears:
            raise ValueError(
                "the model has no LoRA linear layers to route; call "
                "lorakit.serve.prepare_for_serving(model, target_modules) first."
            )
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        base_dtype = linears[0][1].base_float_dtype  # float32 on a quantized base
        self.dtype = dtype or default_adapter_dtype(base_dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"the bank's dtype must be a floating-point dtype, got {self.dtype}")
        self.compute_dtype = product_dtype(self.dtype)
        self.max_rank = max_rank
        self.page_rank = page_rank or min(4, max_rank)
        if self.page_rank < 1:
            raise ValueError(f"page_rank must be >= 1, got {page_rank}")
        sizes = self._sizes(linears, capacity, memory_budget, layer_shares)
        self.capacity, self.pages, self.pool_pages = sizes.slots, sizes.pages, sizes.lengths
        self.memory_budget = memory_budget
        self._stacks: dict[str, LayerStack] = {}
        self._by_layer: dict[int, LayerStack] = {}
        for name, layer in linears:
            stack = allocate_stack(
                name, layer, self.capacity, self.pool_pages[name], self.page_rank, self.dtype
            )
            self._stacks[name] = stack
            self._by_layer[id(layer)] = stack
        self._lock = threading.RLock()
        self._held = Residency(self.capacity, self.pages)  # slots, pages, LRU, holds, pins
        self._configs: dict[str, LoraConfig] = {}
        self._forgotten: Counter[str] = Counter()  # times each name was forget()-ed
        self._loading: dict[str, Future] = {}  # name -> its lazy load under way

    # ----------------------------------------------------------------- sizing
    def pages_for(self, rank: int) -> int:
        """Pages an adapter of ``rank`` takes: ``ceil(rank / page_rank)``."""
        return -(-rank // self.page_rank)

    def _sizes(self, linears, capacity: int | None, memory_budget: int | None, shares) -> PoolSizes:
        """Slots, page numbers and pool lengths (``pool_sizes``): a page costs
        ``page_bytes(layer)`` in each pool that holds it; a slot its scalings."""
        sizes = {name: page_bytes(layer, self.page_rank, self.dtype) for name, layer in linears}
        self._layer_page_bytes = sizes
        self.page_bytes = sum(sizes.values())  # a page number in every pool
        item = torch.empty((), dtype=self.compute_dtype).element_size()
        self.slot_overhead = item * len(linears)  # a scaling per layer, in compute_dtype
        per_adapter = self.pages_for(self.max_rank)
        self.slot_bytes = per_adapter * self.page_bytes + self.slot_overhead  # at max_rank
        return pool_sizes(
            sizes,
            max_rank=self.max_rank,
            per_adapter=per_adapter,
            slot_overhead=self.slot_overhead,
            capacity=capacity,
            memory_budget=memory_budget,
            shares=shares,
        )

    def memory_bytes(self) -> int:
        """Bytes held by the page pools and scalings (fixed at construction; <=
        ``memory_budget``), plus the DoRA gain tables (``(slots + 1) x d`` per layer, float32 or
        float64 as the pools, made when the first DoRA adapter is loaded; outside
        ``memory_budget``, so from then on the total may exceed it)."""
        return sum(
            s.lora_A.nbytes
            + s.lora_B_t.nbytes
            + s.scaling.nbytes
            + (0 if s.dora_gain is None else s.dora_gain.nbytes)
            for s in self._stacks.values()
        )

    def resident_bytes(self) -> int:
        """Bytes of the pages the loaded adapters hold (proportional to their ranks): a page
        number in use, in every pool long enough to hold it."""
        return sum(
            (length - self._held.free_pages.free_below(length)) * self._layer_page_bytes[name]
            for name, length in self.pool_pages.items()
        )

    # ----------------------------------------------------------------- lookup
    def stack_for(self, layer: nn.Module) -> LayerStack | None:
        """The stacks of a LoRA layer of the served model (None: not routed)."""
        return self._by_layer.get(id(layer))

    @property
    def layer_names(self) -> list[str]:
        return list(self._stacks)

    @property
    def page_table(self) -> dict[int, torch.Tensor]:
        """Slot -> the pages (n,) of the adapter it holds, in rank order (read by the routers;
        an entry is replaced, never changed, so a reader that kept one can tell by identity)."""
        return self._held.page_table

    @property
    def evictions(self) -> int:
        """Adapters the LRU policy evicted to make room."""
        return self._held.evictions

    def names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return self._held.names()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._held

    @property
    def loaded_count(self) -> int:
        """How many adapters are loaded, read WITHOUT the lock (a snapshot for ``/health``, which
        must answer while a load or an unload holds the lock)."""
        return len(self._held)

    def config(self, name: str) -> LoraConfig:
        with self._lock:
            self._held.slot(name)
            return self._configs[name]

    def slot_of(self, name: str) -> int:
        with self._lock:
            return self._held.slot(name)

    # ----------------------------------------------------------------- load
    def load(
        self,
        name: str,
        config: LoraConfig,
        tensors: Mapping[str, torch.Tensor],
        *,
        pin: bool = False,
    ) -> int:
        """Load an adapter from PEFT-format tensors (``base_model.model.<path>.lora_A.weight``
        (r, k) and ``.lora_B.weight`` (d, r)); evicts the LRU adapter when full. Returns its slot."""
        return self.load_prepared(self.prepare(name, config, tensors), pin=pin)

    def prepare(
        self, name: str, config: LoraConfig, tensors: Mapping[str, torch.Tensor]
    ) -> PreparedAdapter:
        """Check ``tensors`` against the bank (``AdapterFileError``) and work out each layer's
        scaling (``checks.prepare_adapter``); takes no lock (nothing of the bank changes)."""
        return prepare_adapter(name, config, tensors, self._stacks, self.max_rank)

    def check_shapes(self, name: str, config: LoraConfig, entries: Mapping[str, object]) -> None:
        """``prepare``'s checks on a file's header entries (keys, shapes, dtypes, ranks), before
        its data is read; ``AdapterFileError``."""
        lora_pairs(name, config, entries, self._stacks, self.max_rank)

    def load_prepared(self, prepared: PreparedAdapter, *, pin: bool = False) -> int:
        """``load`` of an adapter ``prepare`` checked: only the slot write happens here."""
        with self._lock:
            if prepared.name in self._held:
                raise ValueError(f"adapter {prepared.name!r} is already loaded; unload it first.")
            return self._commit(prepared, pin=pin)

    def _commit(self, prepared: PreparedAdapter, *, pin: bool) -> int:
        """Write a prepared adapter into a slot (evicting the LRU adapter if needed); its slot."""
        rank = max(lora_A.shape[0] for lora_A, _ in prepared.pairs.values())
        # pages below the shortest pool of its layers; adapters of only some layers from the
        # end: the others' pages stay one compact run (serve/pages.py, serve/pool_sizes.py)
        limit = min(self.pool_pages[name] for name in prepared.pairs)
        some_layers = len(prepared.pairs) < len(self._stacks)
        pages_needed = self.pages_for(rank)
        try:
            self._held.require_room(pages_needed, limit, self.page_rank)
        except BankFullError:  # the next load checks this before reading the files again
            self._held.found_no_room(prepared.name, pages_needed, limit)
            raise
        slot, pages = self._held.take(pages_needed, limit, some_layers, self.evict)
        with torch.no_grad():
            for layer_name, stack in self._stacks.items():
                pair = prepared.pairs.get(layer_name)
                scale, gain = prepared.scales.get(layer_name, 0.0), prepared.gains.get(layer_name)
                write_slot(stack, slot, pages, pair, scale, gain)
        self._held.add(prepared.name, slot, pages, pin=pin)
        self._configs[prepared.name] = prepared.config
        return slot

    def load_from_model(
        self, name: str, model: nn.Module, adapter_name: str = "default", *, pin: bool = False
    ) -> int:
        """Copy adapter ``adapter_name`` of an injected (in-memory) ``model`` into the bank: the
        tensors a save would write (``io.save.adapter_file_entries``), under their file keys,
        so what the bank cannot serve (a bias on B, a saved module, trained biases or token
        rows) is refused naming it, as from a file."""
        from lorakit.io.file_tensors import model_tensor
        from lorakit.io.save import adapter_file_entries

        entries, _ = adapter_file_entries(model, adapter_name, [])
        tensors = {e.key: model_tensor(model, e, adapter_name).detach() for e in entries}
        return self.load(name, adapter_configs(model)[adapter_name], tensors, pin=pin)
