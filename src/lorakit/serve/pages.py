"""The free pages of the adapter bank's pools, handed out in contiguous, aligned runs.

An adapter of n pages gets, in this order of preference:

1. n consecutive pages starting at a multiple of n (aligned): adapters of one page count then sit
   at a regular stride, so the batched op reads a run of them in place as windows of n pages
   (``lorakit.serve.row_groups``), as it would read slots of a stack of fixed rank;
2. n consecutive pages anywhere (the op still reads them as one block, in windows of fewer pages);
3. the n lowest free pages (scattered: the op reads them page by page).

Any n free pages are accepted, so the number of adapters that fit (memory proportional to the
ranks held) is the same whatever the placement; only the speed of the op depends on it.

``from_end``: the same preferences searched from the last page down. The bank places adapters
that adapt only some of the layers (q/v only, say) from the end and the others from the start,
so in a layer that only the latter adapt, their pages form one compact run that the op reads in
place, instead of runs broken by the former's pages.
"""

from __future__ import annotations

__all__ = ["FreePages"]


class FreePages:
    """Which of ``pages`` pages are free (not thread-safe: the bank's lock guards it)."""

    def __init__(self, pages: int) -> None:
        self._free = bytearray(b"\x01") * pages
        self.count = pages  # free pages

    def take(self, count: int, *, from_end: bool = False, limit: int | None = None) -> list[int]:
        """``count`` free pages below ``limit`` (default: all), now in use: an aligned run, else
        a run, else the lowest ones (``from_end``: the last aligned run, else the last run, else
        the highest pages). ``ValueError`` if fewer are free (the caller evicts first)."""
        limit = len(self._free) if limit is None else limit
        free = self.free_below(limit)
        if count < 1 or count > free:
            where = "" if limit == len(self._free) else f" below page {limit}"
            raise ValueError(f"cannot take {count} pages: {free} are free{where}")
        find = self._last_run if from_end else self._run
        start = find(count, limit, aligned=True)
        if start is None:
            start = find(count, limit, aligned=False)
        if start is not None:
            pages = list(range(start, start + count))
        else:
            free_pages = [page for page in range(limit) if self._free[page]]
            pages = free_pages[-count:] if from_end else free_pages[:count]
        for page in pages:
            self._free[page] = 0
        self.count -= count
        return pages

    def free_below(self, limit: int) -> int:
        """How many of the pages [0, ``limit``) are free."""
        return self._free.count(1, 0, limit)

    def give(self, pages: list[int]) -> None:
        """Return ``pages`` (in use) to the free pages."""
        for index, page in enumerate(pages):
            if self._free[page] or page in pages[:index]:
                raise ValueError(f"page {page} is free already")
        for page in pages:
            self._free[page] = 1
        self.count += len(pages)

    def _run(self, count: int, limit: int, *, aligned: bool) -> int | None:
        """First start of ``count`` consecutive free pages below ``limit`` (a multiple of
        ``count`` if ``aligned``); None if there is none."""
        wanted, position = b"\x01" * count, 0
        while True:
            position = self._free.find(wanted, position, limit)
            if position < 0 or not aligned or position % count == 0:
                return None if position < 0 else position
            position += -position % count  # the next aligned start

    def _last_run(self, count: int, limit: int, *, aligned: bool) -> int | None:
        """Last start of ``count`` consecutive free pages below ``limit`` (a multiple of
        ``count`` if ``aligned``); None if there is none."""
        wanted = b"\x01" * count
        if not aligned:
            position = self._free.rfind(wanted, 0, limit)
            return None if position < 0 else position
        last = (limit - count) // count * count
        return next(
            (s for s in range(last, -1, -count) if self._free[s : s + count] == wanted), None
        )
