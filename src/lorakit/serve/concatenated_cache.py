"""The concatenating batched cache (``ConcatenatedCache``), which ``kv.BatchedCache`` falls back
to for a model whose cache layers are not all plain attention layers: hybrid models with
state-space, short-convolution or linear-attention layers (Lfm2, Jamba, Bamba, Qwen3-Next), and
the row bookkeeping both caches share (``MaskedRows``).

Rows are requests, as in ``kv``: each row's real tokens are right-aligned at the end of the time
axis, ``mask`` (B, T) = 0 over the left padding. How a row joins depends on the layer type
(transformers' ``cache_utils``, the types ``DynamicCache(config=...)`` builds):

- attention (``DynamicLayer``): keys and values (B, heads, T, head_dim); both sides padded on
  the left to the common width, rows concatenated;
- sliding-window attention (``DynamicSlidingWindowLayer``): keeps only its last
  ``min(T, window - 1)`` columns, padded on the left to the longer side in the same way, and
  counts the positions seen (``cumulative_length``, the offset of its attention mask into the
  batch's ``mask``): the count is set to T, the batch's width;
- linear attention, state-space and convolution layers (``LinearAttentionLayer``): a state of a
  fixed shape per row and no time axis, ``conv_states[i]`` (B, channels, kernel) and
  ``recurrent_states[i]`` (B, ...), concatenated along the rows. A row's state is that of its
  own prompt alone (no padding ever entered it; a decode step gives these layers no mask), so
  each row decodes as it would alone. Its token count is set to T;
- both at once (``LinearAttentionAndFullAttentionLayer``,
  ``LinearAttentionAndSlidingWindowAttentionLayer``); ``DummyLayer``: nothing.

A leave keeps the rows' slices of every per-row tensor and drops the time columns that are now
padding in every row. Any other layer type (a model's own cache class, a static, quantized or
indexed layer) cannot be joined: ``add`` raises ValueError naming it and leaves the batch as it
was. The engine serves a model whose config announces such layers one request at a time by
itself (``one_at_a_time``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import (
    CacheLayerMixin,
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)

__all__ = ["JOINABLE_LAYERS", "ConcatenatedCache", "MaskedRows", "pad_time_left"]

JOINABLE_LAYERS = (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    DummyLayer,
)
"""The cache layer types rows can join in (exact types: a subclass may keep more state)."""


def pad_time_left(tensor: torch.Tensor, extra: int) -> torch.Tensor:
    """(B, heads, T, head_dim) -> (B, heads, T + extra, head_dim), zeros on the left."""
    return F.pad(tensor, (0, 0, extra, 0)) if extra else tensor


class MaskedRows:
    """What both caches keep beside the layers: ``mask`` (rows, width), 1 on each row's real
    tokens, which are right-aligned (left padding), and ``lengths`` (rows,)."""

    mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def _mask_add_row(self, length: int) -> None:
        """One more row of ``length`` tokens; the width grows to ``length`` if that is longer."""
        width = max(self.width, length)
        row_mask = torch.cat(
            [torch.zeros(width - length, dtype=torch.long), torch.ones(length, dtype=torch.long)]
        )
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), row_mask[None]])
        self.lengths = torch.cat([self.lengths, torch.tensor([length])])

    def _mask_keep_rows(self, index: torch.Tensor) -> int:
        """Only the rows ``index`` (non-empty), without the leftmost columns none of them uses;
        returns how many columns were dropped."""
        self.mask = self.mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        drop = self.width - int(self.lengths.max())
        self.mask = self.mask[:, drop:]
        return drop


class ConcatenatedCache(MaskedRows):
    """The batch's cache over transformers' own layers (the module docstring): joins and leaves
    pad and copy, a decode step is the layers' own update (concatenating one column)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.lengths = torch.zeros(0, dtype=torch.long)

    def add(self, row_cache: DynamicCache, length: int) -> None:
        """Append one request whose cache (batch 1) holds exactly its ``length`` real tokens."""
        if self.cache is None or self.rows == 0:
            self.cache = row_cache
            self.mask = torch.ones(1, length, dtype=torch.long)
            self.lengths = torch.tensor([length])
            return
        _check_joinable(self.cache.layers, row_cache.layers)
        width = max(self.width, length)
        for layer, new in zip(self.cache.layers, row_cache.layers, strict=True):
            _join_layer(layer, new, width)
        self._mask_add_row(length)

    def attends(self) -> bool:
        """False when no layer holds keys (only state-space / linear-attention / convolution
        and dummy layers: Mamba): a decode step then takes no attention mask, as in
        transformers' ``generate`` (Mamba's mixer multiplies its (B, 1) input by the 2-D
        mask, which a (B, T + 1) one broadcasts to T + 1 tokens)."""
        return any(isinstance(layer, CacheLayerMixin) for layer in self.cache.layers)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop time columns that are now all padding."""
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self._mask_keep_rows(index)
        for layer in self.cache.layers:
            _keep_layer_rows(layer, index, self.width)


def _check_joinable(layers: list, new_layers: list) -> None:
    """ValueError, before anything changes, unless each layer of the batch and of the joining
    row is of one type of ``JOINABLE_LAYERS``, the same for both."""
    if len(layers) != len(new_layers):
        raise ValueError(
            f"cannot join a request to the running batch: its cache has {len(new_layers)} "
            f"layers, the batch's {len(layers)}"
        )
    for index, (layer, new) in enumerate(zip(layers, new_layers, strict=True)):
        if type(new) not in JOINABLE_LAYERS or type(new) is not type(layer):
            raise ValueError(
                f"cannot join a request to the running batch: cache layer {index} is a "
                f"{type(new).__name__}, which lorakit cannot batch (it joins transformers' "
                f"{', '.join(t.__name__ for t in JOINABLE_LAYERS)}); serve this model one "
                "request at a time (max_batch=1, lorakit serve --max-batch 1)"
            )


def _join_layer(layer, new, width: int) -> None:
    """Add the one row of ``new`` to ``layer`` (same type), the batch becoming ``width`` wide."""
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        states = (
            (layer.conv_states, new.conv_states),
            (layer.recurrent_states, new.recurrent_states),
        )
        for batch_states, row_states in states:
            for i, state in batch_states.items():
                if state is not None and row_states[i] is not None:
                    batch_states[i] = torch.cat([state, row_states[i]])
        layer.cumulative_length_linear.fill_(width)
    if isinstance(layer, DynamicLayer) and layer.keys is not None:
        columns = max(layer.keys.shape[-2], new.keys.shape[-2])
        for name in ("keys", "values"):
            old, row = getattr(layer, name), getattr(new, name)
            joined = [pad_time_left(t, columns - t.shape[-2]) for t in (old, row)]
            setattr(layer, name, torch.cat(joined))
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = width


def _keep_layer_rows(layer, index: torch.Tensor, width: int) -> None:
    """Keep the rows ``index`` of ``layer``, the batch now ``width`` wide: its keys keep their
    last ``min(columns, width)`` columns (a sliding layer keeps fewer than ``width``)."""
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        for states in (layer.conv_states, layer.recurrent_states):
            for i, state in states.items():
                if state is not None:
                    states[i] = state.index_select(0, index)
        layer.cumulative_length_linear.fill_(width)
    if isinstance(layer, DynamicLayer) and layer.keys is not None:
        columns = min(layer.keys.shape[-2], width)
        for name in ("keys", "values"):
            tensor = getattr(layer, name).index_select(0, index)
            setattr(layer, name, tensor[:, :, tensor.shape[-2] - columns :])
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = width
