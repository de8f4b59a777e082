"""Which adapters the bank keeps: the holds, pins and evictions half of
``lorakit.serve.bank.AdapterBank`` (which inherits it).

A running request holds its adapter (``acquire`` in ``lazy_loads``, ``release`` here), so it is
never evicted while in use; a pinned adapter is never evicted by the LRU policy; ``evict``
removes one now, ``forget`` also makes its loads under way fail. ``has_room`` / ``room_for`` say
whether a load would find a slot and its pages. Each method is one step under the bank's lock
over its ``Residency`` (``lorakit.serve.residency``: the bookkeeping, no tensors).

The bank's state this reads and changes: ``_lock``, ``_held`` (``Residency``), ``_configs``,
``_stacks`` (a slot evicted is no longer ``present`` in any layer), ``_forgotten`` and
``_loading`` (``forget``).
"""

from __future__ import annotations

import threading

__all__ = ["BankHolds"]


class BankHolds:
    """The holds, pins and evictions half of ``AdapterBank`` (see the module docstring)."""

    @property
    def lock(self) -> threading.RLock:
        """The bank's re-entrant lock: hold it to make several bank calls and your own
        bookkeeping one atomic step (``ServedAdapters.remove`` does)."""
        return self._lock

    def release(self, name: str) -> None:
        with self._lock:
            self._held.release(name)

    def in_use(self, name: str) -> int:
        """How many running requests hold ``name``."""
        with self._lock:
            return self._held.in_use(name)

    def pin(self, name: str) -> None:
        """Never evict ``name`` by the LRU policy (``evict`` still removes it)."""
        with self._lock:
            self._held.pin(name)

    def pinned(self) -> list[str]:
        """Pinned adapters (loaded ones only), least recently used first."""
        with self._lock:
            return self._held.pinned()

    def unpin(self, name: str) -> None:
        with self._lock:
            self._held.unpin(name)

    def forget(self, name: str) -> None:
        """Evict ``name`` if it is loaded, and make the loads of it under way (``acquire`` /
        ``ensure_loaded`` reading its files) fail with ``KeyError`` instead of putting it back.
        ``AdapterInUseError`` while a request uses it (then nothing changes)."""
        with self._lock:
            if name in self._held:
                self.evict(name)
            self._forgotten[name] += 1
            self._held.forget_needs(name)
            self._loading.pop(name, None)  # later callers read again (if it is added again)

    def evict(self, name: str) -> None:
        """Remove ``name`` now. Raises ``AdapterInUseError`` while a request uses it."""
        with self._lock:
            slot = self._held.remove(name)
            del self._configs[name]
            for stack in self._stacks.values():
                stack.present.discard(slot)

    def has_room(self, pages: int = 1, limit: int | None = None) -> bool:
        """A load of an adapter of ``pages`` pages below page ``limit`` (default: any) would
        find a slot and the pages now, evicting adapters no request uses."""
        with self._lock:
            return self._held.has_room(pages, limit)

    def room_for(self, name: str) -> bool:
        """``has_room`` for adapter ``name``: its pages below its limit when a load of it found no
        room before (the bank learns them only from its tensors), else one page anywhere."""
        with self._lock:
            return self._held.has_room(*self._held.needs(name))
