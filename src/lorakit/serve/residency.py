"""Which adapters the bank holds: their slots and pages, which are in use or pinned, and which
to evict to make room (the least recently used one no request uses).

Bookkeeping only, no tensors of the adapters: ``AdapterBank`` writes and clears the pools, and
its lock guards every call here (this class is not thread-safe on its own).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from lorakit.serve.pages import FreePages

__all__ = ["AdapterInUseError", "BankFullError", "Residency"]


class BankFullError(RuntimeError):
    """No room for an adapter now: every slot, or too many of the pages its layers' pools hold,
    belong to adapters pinned or used by running requests (the message says which)."""


class AdapterInUseError(RuntimeError):
    """The adapter cannot be evicted now: a running request uses it."""


class Residency:
    """``slots`` adapter slots and ``pages`` page numbers, and who holds them.

    ``page_table``: slot -> its pages (n,) in rank order. ``evictions``: adapters evicted to make
    room (not those removed on request).
    """

    def __init__(self, slots: int, pages: int) -> None:
        self.slots, self.pages = slots, pages
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._free_slots = list(range(slots - 1, -1, -1))
        self.free_pages = FreePages(pages)  # aligned runs first (serve/pages.py)
        self.page_table: dict[int, torch.Tensor] = {}
        self._in_use: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._needs: dict[str, tuple[int, int]] = {}  # pages, limit of loads that found no room
        self.evictions = 0

    # ----------------------------------------------------------------- lookup
    def names(self) -> list[str]:
        """Held adapters, least recently used first."""
        return list(self._slot_of)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot(self, name: str) -> int:
        """``name``'s slot; ``KeyError`` naming the held adapters when it is not held."""
        if name not in self._slot_of:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self._slot_of)}")
        return self._slot_of[name]

    # ----------------------------------------------------------------- use and pins
    def use(self, name: str, hold: bool) -> int:
        """Mark ``name`` recently used (and, with ``hold``, used by one more request); its slot."""
        slot = self.slot(name)
        self._slot_of.move_to_end(name)
        if hold:
            self._in_use[name] = self._in_use.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        count = self._in_use.get(name, 0) - 1
        if count > 0:
            self._in_use[name] = count
        else:
            self._in_use.pop(name, None)

    def in_use(self, name: str) -> int:
        """How many running requests hold ``name``."""
        return self._in_use.get(name, 0)

    def pin(self, name: str) -> None:
        self.slot(name)
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)

    def pinned(self) -> list[str]:
        """Pinned adapters, least recently used first."""
        return [name for name in self._slot_of if name in self._pinned]

    def evictable(self, name: str) -> bool:
        return name not in self._pinned and not self._in_use.get(name)

    # ----------------------------------------------------------------- room
    def has_room(self, pages: int = 1, limit: int | None = None) -> bool:
        """A slot and ``pages`` pages below page ``limit`` (default: any) are free, or would be
        after evicting adapters no request uses."""
        limit = self.pages if limit is None else limit
        evictable = [name for name in self._slot_of if self.evictable(name)]
        freeable = sum(self._pages_below(name, limit) for name in evictable)
        slot = bool(self._free_slots) or bool(evictable)
        return slot and self.free_pages.free_below(limit) + freeable >= pages

    def needs(self, name: str) -> tuple[int, int | None]:
        """``(pages, limit)`` of ``name`` when a load of it found no room, else one page
        anywhere: what a load checks before reading its files (it learns them from the tensors)."""
        return self._needs.get(name, (1, None))

    def found_no_room(self, name: str, pages: int, limit: int) -> None:
        self._needs[name] = (pages, limit)

    def forget_needs(self, name: str) -> None:
        self._needs.pop(name, None)

    def require_room(self, pages: int, limit: int | None, page_rank: int) -> None:
        """``BankFullError`` saying what to change unless ``has_room(pages, limit)``."""
        limit = self.pages if limit is None else limit
        if pages > limit:
            raise BankFullError(
                f"an adapter of {pages} pages (rank up to {pages * page_rank}) cannot fit "
                f"a bank whose pools for its layers hold {limit} pages; raise --adapter-memory."
            )
        if not self.has_room(pages, limit):
            raise BankFullError(self._what_ran_out(pages, limit, page_rank))

    def _what_ran_out(self, pages: int, limit: int, page_rank: int) -> str:
        """``require_room``'s message: which of the two ran out, with its numbers and the option
        that adds more. Slots: none free and every held adapter pinned or used by a running
        request (--max-adapters). Pages: below ``limit`` (the shortest pool of the adapter's
        layers), free + freeable by evicting idle adapters < ``pages``; the rest of them are held
        by adapters pinned or in use (--adapter-memory)."""
        held = [name for name in self._slot_of if not self.evictable(name)]
        in_use = sum(1 for name in held if self._in_use.get(name))
        reasons = []
        if not self._free_slots and len(held) == len(self._slot_of):
            reasons.append(
                f"all {self.slots} adapter slots hold adapters pinned or used by running "
                f"requests ({in_use} in use, {len(held) - in_use} pinned and idle); "
                "raise --max-adapters"
            )
        free = self.free_pages.free_below(limit)
        freeable = sum(
            self._pages_below(name, limit) for name in self._slot_of if self.evictable(name)
        )
        if free + freeable < pages:
            taken = sum(self._pages_below(name, limit) for name in held)
            holders = sum(1 for name in held if self._pages_below(name, limit))
            where = (
                f"the bank's {self.pages} pages"
                if limit >= self.pages
                else f"the {limit} pages the pools of its layers hold (their layer shares of "
                f"the bank's {self.pages})"
            )
            reasons.append(
                f"an adapter of rank up to {pages * page_rank} needs {pages} of {where}: "
                f"{free} are free, {freeable} more can be freed by evicting idle adapters, and "
                f"{taken} are held by {holders} adapter(s) pinned or used by running requests; "
                "raise --adapter-memory"
            )
        if not reasons:  # (has_room and this account disagree: say what is known)
            reasons.append(f"no room among the bank's {self.slots} slots and {self.pages} pages")
        unpin = ", unpin an adapter" if self._pinned else ""
        return "; ".join(reasons) + f"{unpin}, or retry later when running requests finish."

    def take(
        self, pages: int, limit: int, from_end: bool, evict: Callable[[str], None]
    ) -> tuple[int, torch.Tensor]:
        """A free slot and ``pages`` free pages below ``limit`` (``FreePages.take``), calling
        ``evict(name)`` on the least recently used adapters no request uses until they are
        free (those holding pages below ``limit`` when pages are short). The caller has checked
        ``require_room``."""
        while not self._free_slots or self.free_pages.free_below(limit) < pages:
            short = self.free_pages.free_below(limit) < pages
            victim = next(  # least recently used, and freeing pages where they are needed
                name
                for name in self._slot_of
                if self.evictable(name) and (not short or self._pages_below(name, limit))
            )
            evict(victim)
            self.evictions += 1
        taken = self.free_pages.take(pages, from_end=from_end, limit=limit)
        return self._free_slots.pop(), torch.tensor(taken, dtype=torch.long)

    def _pages_below(self, name: str, limit: int) -> int:
        pages = self.page_table[self._slot_of[name]]
        return pages.numel() if limit >= self.pages else int((pages < limit).sum())

    # ----------------------------------------------------------------- add and remove
    def add(self, name: str, slot: int, pages: torch.Tensor, *, pin: bool = False) -> None:
        """Record ``name`` in ``slot`` (from ``take``) with ``pages``, most recently used."""
        self.page_table[slot] = pages
        self._slot_of[name] = slot
        self._needs.pop(name, None)
        if pin:
            self._pinned.add(name)

    def remove(self, name: str) -> int:
        """Free ``name``'s slot and pages; its former slot. ``AdapterInUseError`` while a
        request uses it (nothing changes)."""
        self.slot(name)
        if self._in_use.get(name):
            raise AdapterInUseError(
                f"adapter {name!r} is used by {self._in_use[name]} running request(s); "
                "retry when they finish."
            )
        slot = self._slot_of.pop(name)
        self._pinned.discard(name)
        self._free_slots.append(slot)
        self.free_pages.give(self.page_table.pop(slot).tolist())
        return slot
