"""Which rows of one forward go to which adapter, and where its pages lie: built once per forward
(``group_rows``, with the bank's page table) and read by every layer's op
(``lorakit.serve.batched``).

Rows of one slot form a segment. Long segments (``LOOP_MIN_ROWS`` rows or more) run alone: their
rows are a slice when contiguous, and their pages a slice of the pools when consecutive (the
bank hands out consecutive pages, ``lorakit.serve.pages``), else gathered. The short ones are
run as padded grids (``RowGroups.padded``), built for the slots a layer actually holds (the
pages of an adapter that does not adapt a layer are not read there) and split by segment length
into buckets of 1, 2, 3-4, 5-8 and 9-16 rows, so that a hot adapter's few rows do not pad every
cold adapter's single row (buckets share a grid where that padding costs less than a grid's
own operator launches, ``GRID_OVERHEAD_BYTES``: in small layers). A grid's entries are windows
of ``block`` consecutive pages, window w = pages [w * block, (w + 1) * block): ``block`` is the
largest size that tiles every segment's pages (the gcd of their page counts and first pages
when each is one consecutive run; 1 when one is scattered), so a batch of adapters of one rank,
loaded into aligned runs, has one entry per adapter, as a stack of fixed rank would, and a batch
of mixed ranks one entry per page. When the entries' windows lie within a run of at most twice
as many windows (most of the bank's adapters in the batch), the op reads that run of the pools
in place, the windows of no segment of the grid as fillers whose results are dropped; otherwise
it gathers copies of the entries' windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

import torch

__all__ = [
    "GRID_OVERHEAD_BYTES",
    "LOOP_MIN_ROWS",
    "PaddedSegments",
    "RowGroups",
    "Segment",
    "group_rows",
    "length_bucket",
    "padded_grids",
]

# Segments with at least this many rows run as their own pair of matmuls; shorter ones are padded
# and batched together (when there are at least two of them).
LOOP_MIN_ROWS = 16

# What a grid costs beyond its rows (about ten operator launches), as bytes of padded rows:
# two length buckets run as one grid when merging them pads fewer bytes than this.
GRID_OVERHEAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Segment:
    """Rows sharing one adapter slot: a ``slice`` when contiguous, else a LongTensor of rows;
    ``pages`` (n,) the slot's pages, ``first_page`` their first when they are consecutive
    (``pages = first_page + arange(n)``: read as a slice of the pools), else None."""

    slot: int
    rows: slice | torch.Tensor
    pages: torch.Tensor
    first_page: int | None = None


@dataclass(frozen=True)
class PaddedSegments:
    """The short segments as one grid of E entries, each a window of ``block`` consecutive
    pages, each segment's rows padded to L = ``length`` rows.

    ``window_run``: the entries are the windows of this run, read in place (fillers included);
    None: the entries are ``windows`` (E,), gathered. ``entry_slots`` (E,) each entry's slot (a
    filler: any slot of the batch), ``gather_rows`` (E*L,) rows of x (padding and fillers
    repeat a valid row), ``valid`` (M,) positions of real rows in the E*L grid (None: all are),
    ``dest_rows`` (M,) where their results go."""

    block: int
    window_run: slice | None
    windows: torch.Tensor
    entry_slots: torch.Tensor
    length: int
    gather_rows: torch.Tensor
    valid: torch.Tensor | None
    dest_rows: torch.Tensor
    slots: frozenset[int]


@dataclass(frozen=True)
class RowGroups:
    """How the N rows of one forward map to adapter slots (built once, used by every layer).

    ``looped``: the long segments; ``short``: slot -> rows of the short ones, with their pages in
    ``short_pages``, run as the grids of ``padded``."""

    num_rows: int
    looped: tuple[Segment, ...]
    short: Mapping[int, list[int]]
    short_pages: Mapping[int, torch.Tensor]
    slots: frozenset[int]
    row_slots: torch.Tensor | None = None  # (N,) each row's slot, -1 for none (DoRA's gains)
    _grids: dict[tuple[frozenset[int], int | None], tuple[PaddedSegments, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def padded(
        self, present: Set[int] | None = None, row_bytes: int | None = None
    ) -> tuple[PaddedSegments, ...]:
        """The grids of the short segments whose slot is in ``present`` (a layer's slots; None:
        all), one per length bucket, buckets merged where padding ``row_bytes`` (a row's bytes
        of x and of the output) costs less than a grid (``padded_grids``); built at a layer's
        first call and reused by every layer with the same slots and row bytes (one forward
        runs in one thread)."""
        slots = frozenset(slot for slot in self.short if present is None or slot in present)
        grids = self._grids.get((slots, row_bytes))
        if grids is None:
            short = {slot: rows for slot, rows in self.short.items() if slot in slots}
            grids = padded_grids(short, self.short_pages, row_bytes)
            self._grids[slots, row_bytes] = grids
        return grids


def group_rows(
    row_slots: torch.Tensor | Sequence[int],
    page_table: Mapping[int, torch.Tensor],
    mode: str | None = None,
) -> RowGroups:
    """Group rows by slot (-1: no adapter); ``page_table`` slot -> its pages (n,) (the bank's).
    ``mode``: None (by segment size), "loop" or "padded"."""
    values = torch.as_tensor(row_slots, dtype=torch.long).reshape(-1).tolist()
    groups: dict[int, list[int]] = {}
    for row, slot in enumerate(values):
        if slot >= 0:
            groups.setdefault(slot, []).append(row)
    if mode not in (None, "loop", "padded"):
        raise ValueError(f"mode must be None, 'loop' or 'padded', got {mode!r}")
    missing = [slot for slot in groups if slot not in page_table]
    if missing:
        raise KeyError(f"slots {missing} hold no adapter; load one there first")
    if mode == "loop":
        short = {}
    elif mode == "padded":
        short = groups
    else:
        short = {slot: rows for slot, rows in groups.items() if len(rows) < LOOP_MIN_ROWS}
        short = short if len(short) >= 2 else {}
    looped = tuple(
        _segment(slot, rows, page_table[slot]) for slot, rows in groups.items() if slot not in short
    )
    short_pages = {slot: page_table[slot] for slot in short}
    return RowGroups(
        len(values), looped, short, short_pages, frozenset(groups), torch.tensor(values)
    )


def length_bucket(rows: int) -> int:
    """The bucket of a segment of ``rows`` rows: the smallest power of two >= rows."""
    return 1 << (rows - 1).bit_length()


def padded_grids(
    short: Mapping[int, list[int]],
    page_table: Mapping[int, torch.Tensor],
    row_bytes: int | None = None,
) -> tuple[PaddedSegments, ...]:
    """One grid (``_padded``) per length bucket of the segments ``short`` (slot -> rows), the
    shortest first; () when there are none. With ``row_bytes``, a bucket joins the grid of the
    shorter ones when padding their entries (one per page at most) to its length adds fewer
    than ``GRID_OVERHEAD_BYTES`` (small layers: one grid; SmolLM2's with 100 one-row adapters
    beside a few hot ones: apart)."""
    buckets: dict[int, dict[int, list[int]]] = {}
    for slot, rows in short.items():
        buckets.setdefault(length_bucket(len(rows)), {})[slot] = rows
    grids: list[dict[int, list[int]]] = []
    for size in sorted(buckets):
        if grids and row_bytes is not None:
            entries = sum(page_table[slot].numel() for slot in grids[-1])
            length = max(len(rows) for rows in grids[-1].values())
            longer = max(len(rows) for rows in buckets[size].values())
            if entries * (longer - length) * row_bytes < GRID_OVERHEAD_BYTES:
                grids[-1] = {**grids[-1], **buckets[size]}
                continue
        grids.append(buckets[size])
    return tuple(_padded(grid, page_table) for grid in grids)


def first_of_run(pages: list[int]) -> int | None:
    """``pages[0]`` when ``pages`` are consecutive ascending page numbers, else None."""
    return pages[0] if pages == list(range(pages[0], pages[0] + len(pages))) else None


def _segment(slot: int, rows: list[int], pages: torch.Tensor) -> Segment:
    first_page = first_of_run(pages.tolist())
    if rows[-1] - rows[0] == len(rows) - 1:  # ascending and contiguous
        return Segment(slot, slice(rows[0], rows[-1] + 1), pages, first_page)
    return Segment(slot, torch.tensor(rows), pages, first_page)


def _block(pages_of: Mapping[int, list[int]]) -> int:
    """The largest window size that tiles every segment's pages: the gcd of their counts and
    first pages when each is a consecutive run, else 1."""
    sizes = []
    for pages in pages_of.values():
        first = first_of_run(pages)
        if first is None:
            return 1
        sizes += [len(pages), first]
    return math.gcd(*sizes)


def _padded(groups: dict[int, list[int]], page_table: Mapping[int, torch.Tensor]) -> PaddedSegments:
    """The grid of short segments: one entry per window of each segment's pages (read in place
    over the run min..max of windows when that run is at most twice as long: reading it moves
    fewer bytes than gathering copies, which are read, written and read again)."""
    pages_of = {slot: page_table[slot].tolist() for slot in groups}
    block = _block(pages_of)
    slot_of_window = {
        page // block: slot for slot, pages in pages_of.items() for page in pages[::block]
    }
    first, last = min(slot_of_window), max(slot_of_window)
    in_place = last - first + 1 <= 2 * len(slot_of_window)
    grid = range(first, last + 1) if in_place else sorted(slot_of_window)
    length = max(len(rows) for rows in groups.values())
    filler_slot = next(iter(groups))
    filler_row = groups[filler_slot][0]
    entry_slots, gather, valid, dest = [], [], [], []
    for index, window in enumerate(grid):
        slot = slot_of_window.get(window)
        rows = groups[slot] if slot is not None else []
        entry_slots.append(filler_slot if slot is None else slot)
        gather += rows + [filler_row] * (length - len(rows))
        valid += range(index * length, index * length + len(rows))
        dest += rows
    no_padding = len(valid) == len(gather)
    return PaddedSegments(
        block=block,
        window_run=slice(first, last + 1) if in_place else None,
        windows=torch.tensor(list(grid)),
        entry_slots=torch.tensor(entry_slots),
        length=length,
        gather_rows=torch.tensor(gather),
        valid=None if no_padding else torch.tensor(valid),
        dest_rows=torch.tensor(dest),
        slots=frozenset(groups),
    )
