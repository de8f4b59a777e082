"""A left-padded batched KV cache that rows join and leave at token boundaries.

Rows are requests; every row's real tokens are right-aligned at the end of the time axis, with
``mask`` (B, T) = 0 over the left padding. Joining pads either side on the left to a common length;
leaving drops rows and trims time columns that are padding in every remaining row.

Storage: per attention layer two preallocated buffers (rows_cap, kv_heads, time_cap, head_dim),
of which the window ``[:rows, :, start:end]`` is the cache. A decode step writes its one new column
in place at ``end`` (``WindowLayer.update``) and attention reads a view of the window: no
per-step reallocation or concatenation (transformers' ``DynamicCache`` concatenates, copying the
whole cache at every layer of every step; at 64 rows of SmolLM2-135M that was half the step).
Only joins, leaves and running out of capacity copy (rows grow by half again, up to
``max_rows``, the engine's ``max_batch``; time by a quarter plus ``TIME_HEADROOM`` columns).
Padding columns hold zeros (finite, masked out). When the last row leaves, the buffers are
dropped (their memory goes back); the next join allocates them afresh for what it needs.

A prefill starts from ``full_attention_cache``: every attention layer keeps every position, a
sliding-window one included (its mask keeps it in its window). A model whose cache layers are
still not plain ``DynamicLayer``s (linear attention, state-space, convolution layers) falls back
to concatenation over transformers' own layers (``concatenated_cache.ConcatenatedCache``, which
also joins those layers' per-row states).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorakit.serve.concatenated_cache import ConcatenatedCache, MaskedRows

__all__ = [
    "BatchedCache",
    "ConcatenatedCache",
    "WindowLayer",
    "full_attention_cache",
    "preallocatable",
]

TIME_HEADROOM = 64  # extra time columns allocated beyond what is needed now

ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def full_attention_cache(config) -> DynamicCache | None:
    """An empty cache whose layers all keep every position (``DynamicLayer``), for a prefill of
    a model whose layers are all attention (``config.layer_types`` within ``ATTENTION_KINDS``);
    None for another model (linear attention, state-space layers), which builds its own.

    Built without the config, it has no sliding-window layers, which keep only their last
    window - 1 positions and count what they dropped: bookkeeping that joining rows of other
    lengths broke (the batch failed). A sliding-window model still attends within its window,
    by its attention mask (each row's tokens are right-aligned and contiguous, so column
    distance is position distance), over positions kept a little longer than it needs."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    return DynamicCache() if kinds <= ATTENTION_KINDS else None


def preallocatable(cache: DynamicCache) -> bool:
    """True when every layer of ``cache`` is a plain full-attention ``DynamicLayer``."""
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class _Window:
    """The shared window of all layers: rows ``[0, rows)``, time columns ``[start, end)``."""

    def __init__(self) -> None:
        self.rows = self.start = self.end = 0


class WindowLayer(DynamicLayer):
    """A cache layer whose ``keys`` / ``values`` are views of preallocated buffers.

    ``update(k, v)`` with k, v (rows, kv_heads, t, head_dim) writes them at columns
    ``[end, end + t)`` of the window in place and returns the views ``[:rows, :, start:end + t]``;
    ``BatchedCache.advance`` moves ``end`` after the step (all layers write the same columns).
    Paid per layer at every decode step, so in few ops: the buffers' first ``rows`` rows are
    kept as views while the row count stays, the window is one ``narrow`` of them, the new
    columns one ``narrow`` of the window; ``shown`` records the window ``keys`` show (``advance``
    leaves a layer that already shows it as it is).
    """

    def __init__(self, window: _Window, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.window, self.key_buffer, self.value_buffer = window, keys, values
        self.device, self.is_initialized = keys.device, True
        self._rows = -1  # the row count of ``_key_rows`` / ``_value_rows`` (none yet)
        self.refresh()

    def refresh(self, extra: int = 0) -> None:
        """Point ``keys`` / ``values`` at the window (plus ``extra`` columns past ``end``)."""
        w = self.window
        if self._rows != w.rows:
            self._key_rows = self.key_buffer[: w.rows]
            self._value_rows = self.value_buffer[: w.rows]
            self._rows = w.rows
        width = w.end + extra - w.start
        self.keys = self._key_rows.narrow(2, w.start, width)
        self.values = self._value_rows.narrow(2, w.start, width)
        self.shown = (w.rows, w.start, w.end + extra)

    def update(self, key_states, value_states, *args, **kwargs):
        steps = key_states.shape[-2]
        column = self.window.end - self.window.start  # where the new columns go in the window
        self.refresh(extra=steps)
        self.keys.narrow(2, column, steps).copy_(key_states)
        self.values.narrow(2, column, steps).copy_(value_states)
        return self.keys, self.values


class BatchedCache(MaskedRows):
    """``cache`` (a DynamicCache of ``WindowLayer``s over the running rows), ``mask`` (B, T),
    ``lengths`` (B,). ``step_inputs`` before a decode step (it makes room for one column),
    ``advance`` after it.

    ``max_rows`` (None: no bound): the most rows that will ever run at once (the engine's
    ``max_batch``); the buffers' row capacity never grows past it. ``keep([])`` drops the
    buffers, so an idle cache holds no keys or values."""

    def __init__(self, max_rows: int | None = None) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.max_rows = max_rows
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self._window = _Window()
        self._fallback: ConcatenatedCache | None = None

    @property
    def preallocated(self) -> bool:
        """True when the cache's layers are ``WindowLayer``s (not the concatenating fallback)."""
        return self._fallback is None and self.cache is not None

    def _layers(self) -> list[WindowLayer]:
        return self.cache.layers if self.cache is not None else []

    def add(self, row_cache: DynamicCache, length: int) -> None:
        """Append one request whose cache holds exactly its ``length`` real tokens (batch 1)."""
        if self._fallback is None and self.rows == 0 and not preallocatable(row_cache):
            self._fallback = ConcatenatedCache()
        if self._fallback is not None:
            self._fallback.add(row_cache, length)
            self.cache, self.mask, self.lengths = (
                self._fallback.cache,
                self._fallback.mask,
                self._fallback.lengths,
            )
            return
        width = max(self.width, length)
        row_layers = list(row_cache.layers)  # before _reserve: the first row's cache is reused
        self._reserve(self.rows + 1, width, extra_left=width - self.width, like=row_cache)
        w = self._window
        w.start = w.end - width  # grows to the left when this row is longer
        for layer, new in zip(self._layers(), row_layers, strict=True):
            for buffer, states in ((layer.key_buffer, new.keys), (layer.value_buffer, new.values)):
                buffer[: w.rows, :, w.start : w.end - self.width].zero_()  # new left padding
                buffer[w.rows, :, w.start : w.end - length].zero_()
                buffer[w.rows, :, w.end - length : w.end].copy_(states[0])
        w.rows += 1
        for layer in self._layers():
            layer.refresh()
        self._mask_add_row(length)

    def _reserve(self, rows: int, width: int, extra_left: int, like=None) -> None:
        """Make room for ``rows`` rows and a window grown by ``extra_left`` columns on the left
        to ``width``, plus one decode column on the right. Reallocates (copying the window) only
        when the buffers are missing or too small; the new window ends at ``width``."""
        w, old_width = self._window, self.width
        layers = self._layers()
        if layers:
            row_cap, _, time_cap, _ = layers[0].key_buffer.shape
            if self.rows == 0 and rows <= row_cap and width + 1 <= time_cap:
                w.start = w.end = width  # empty: place the window anew
                return
            if rows <= row_cap and w.start >= extra_left and w.end + 1 <= time_cap:
                return
        old_rows = layers[0].key_buffer.shape[0] if layers else 0
        row_cap = self._row_capacity(rows, old_rows)
        time_cap = width + 1 + TIME_HEADROOM + width // 4
        sources = layers or like.layers
        new_layers = []
        for source in sources:
            buffers = []
            pair = (
                (source.key_buffer, source.value_buffer) if layers else (source.keys, source.values)
            )
            for old in pair:
                _, heads, _, head_dim = old.shape
                buffer = old.new_zeros(row_cap, heads, time_cap, head_dim)
                if layers:
                    buffer[: w.rows, :, width - old_width : width] = old[
                        : w.rows, :, w.start : w.end
                    ]
                buffers.append(buffer)
            new_layers.append(buffers)
        w.start, w.end = width - old_width, width
        if self.cache is None:
            self.cache = like
        self.cache.layers = [WindowLayer(w, keys, values) for keys, values in new_layers]

    def _row_capacity(self, rows: int, old_rows: int) -> int:
        """The buffers' row capacity for ``rows`` rows, the buffers holding ``old_rows`` now.

        Rows grow by half again only when they run out (joins one by one: few reallocations),
        never past ``max_rows`` (unless ``rows`` itself is more); a reallocation for time alone
        keeps the row capacity."""
        if rows <= old_rows:
            return old_rows
        grown = max(rows, old_rows + old_rows // 2)
        return grown if self.max_rows is None else max(rows, min(grown, self.max_rows))

    def _drop_buffers(self) -> None:
        """No rows left: forget the layers and their buffers (the memory goes back) and reset
        the window; the next ``add`` allocates buffers for what it needs."""
        self.cache = None
        self._window = _Window()
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.lengths = torch.zeros(0, dtype=torch.long)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop time columns that are now all padding.
        ``rows`` empty: drop the buffers too (``_drop_buffers``)."""
        if self._fallback is not None:
            self._fallback.keep(rows)
            self.cache, self.mask, self.lengths = (
                self._fallback.cache,
                self._fallback.mask,
                self._fallback.lengths,
            )
            if not rows:
                self._fallback = None
            return
        if not rows:
            self._drop_buffers()
            return
        w = self._window
        index = torch.tensor(rows, dtype=torch.long)
        drop = self._mask_keep_rows(index)
        if rows != list(range(len(rows))):  # moved rows: gather them to the front
            for layer in self._layers():
                for buffer in (layer.key_buffer, layer.value_buffer):
                    window = buffer[:, :, w.start : w.end]
                    window[: len(rows)] = window.index_select(0, index)
        w.rows, w.start = len(rows), w.start + drop
        for layer in self._layers():
            layer.refresh()

    def step_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``attention_mask`` (B, T + 1) and ``position_ids`` (B, 1) for one decode step; the
        mask None for a cache without attention layers (``ConcatenatedCache.attends``)."""
        if self._fallback is None:
            self._reserve(self.rows, self.width, extra_left=0)
        elif not self._fallback.attends():
            return None, self.lengths[:, None].clone()
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        return mask, self.lengths[:, None].clone()

    def advance(self) -> None:
        """Record the column the decode step appended."""
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        self.lengths = self.lengths + 1
        if self._fallback is not None:
            self._fallback.mask, self._fallback.lengths = self.mask, self.lengths
            self._fallback.cache = self.cache
            return
        w = self._window
        w.end += 1
        shown = (w.rows, w.start, w.end)
        for layer in self._layers():
            if layer.shown != shown:  # (a layer the step updated shows it already)
                layer.refresh()
