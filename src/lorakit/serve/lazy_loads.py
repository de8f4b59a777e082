"""Loads of adapters while serving: the lazy-load half of ``lorakit.serve.bank.AdapterBank``
(which inherits it).

``acquire`` / ``ensure_loaded`` with a loader read a missing adapter's files and check its tensors
outside the bank's lock; under the lock only the slot is written. One lazy load per adapter at a
time: callers that want an adapter another thread is reading wait for that load (its slot, or its
error) instead of reading the files again. ``forget`` (in the bank) makes a load under way fail
with ``KeyError`` instead of putting the adapter back.

The bank's state this reads and changes: ``_lock``, ``_held`` (``Residency``), ``_loading``
(name -> the ``Future`` of its load under way), ``_forgotten`` (times each name was forgotten),
``page_rank``, and its ``prepare`` and ``_commit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future

import torch

from lorakit.config import LoraConfig

__all__ = ["LazyLoads", "Loader"]

Loader = Callable[[str], tuple[LoraConfig, Mapping[str, torch.Tensor]]]


class LazyLoads:
    """The lazy-load half of ``AdapterBank`` (see the module docstring)."""

    def acquire(self, name: str, loader: Loader | None = None) -> int:
        """Mark ``name`` used by a running request (not evictable until ``release``); its slot.

        A missing adapter is read with ``loader`` first, as in ``ensure_loaded``; writing it into
        a slot and acquiring it are one atomic step, so no other thread can evict it in between.
        """
        return self._lazy_load(name, loader, hold=True)

    def try_acquire(self, name: str) -> int | None:
        """``acquire`` of a loaded adapter; None (and nothing held) when it is not in the bank."""
        with self._lock:
            return self._held.use(name, hold=True) if name in self._held else None

    def ensure_loaded(self, name: str, loader: Loader | None = None) -> int:
        """Load ``name`` with ``loader(name) -> (config, tensors)`` unless it is in the bank; mark
        it recently used; its slot. ``KeyError``: unknown (no loader, or the loader's), or
        ``forget``-ed while it was being read; ``BankFullError``: no free or evictable slot.

        The loader runs outside the bank's lock (another thread's read never stalls the threads
        using the bank; the calling thread of course waits for its own), and only when a slot is
        free or evictable (and, for an adapter a load already found no room for, its pages below
        its limit: ``room_for``): while the bank is full of adapters in use nothing is read.
        Unlike ``acquire`` this does not hold the slot: a thread that only prepares an adapter
        never makes the bank look busy to the engine.
        """
        return self._lazy_load(name, loader, hold=False)

    def _lazy_load(self, name: str, loader: Loader | None, *, hold: bool) -> int:
        """``name``'s slot, used (held if ``hold``): resident, else read by this thread with
        ``loader``, or by the thread already reading it (waited for: its error is raised here
        too). A load that ends before this thread takes the lock again can be evicted in
        between: then this thread loads it."""
        while True:
            with self._lock:
                if name in self._held or loader is None:
                    return self._held.use(name, hold)
                load = self._loading.get(name)
                if load is None:
                    self._held.require_room(*self._held.needs(name), self.page_rank)
                    load = self._loading[name] = Future()
                    generation = self._forgotten[name]
                    break
            load.result()  # (outside the lock) raises that load's error
        return self._read_and_commit(name, loader, load, generation, hold=hold)

    def _read_and_commit(
        self, name: str, loader: Loader, load: Future, generation: int, *, hold: bool
    ) -> int:
        """``_lazy_load`` of the thread that reads: ``loader`` and ``prepare`` outside the lock,
        then the slot write (refused when ``forget`` ran since ``generation``); ``load`` (in
        ``_loading``) ends with the slot or the error, for the threads waiting for it."""
        try:
            prepared = self.prepare(name, *loader(name))
            with self._lock:
                self._end_load(name, load)  # (with the commit: a later caller finds it resident)
                if name not in self._held:  # (else re-added meanwhile: serve that)
                    if self._forgotten[name] != generation:
                        raise KeyError(f"adapter {name!r} was unloaded while it was being read")
                    self._commit(prepared, pin=False)
                slot = self._held.use(name, hold)
        except BaseException as error:
            with self._lock:
                self._end_load(name, load)
            load.set_exception(error)
            raise
        load.set_result(slot)
        return slot

    def _end_load(self, name: str, load: Future) -> None:
        """``load`` is no longer the load of ``name`` that callers wait for (unless ``forget``
        dropped it already and a later load took its place)."""
        if self._loading.get(name) is load:
            del self._loading[name]
