"""A left-padded batched KV cache that rows join and leave at token boundaries.

Rows are requests; every row's real tokens are right-aligned at the end of the time axis, with
``mask`` (B, T) = 0 over the left padding. Joining pads either side on the left to a common length;
leaving drops rows and trims time columns that are padding in every remaining row. Only joins and
leaves copy the cache; a decode step appends one column (transformers' ``DynamicCache``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

__all__ = ["BatchedCache"]


def _pad_time_left(tensor: torch.Tensor, extra: int) -> torch.Tensor:
    """(B, heads, T, head_dim) -> (B, heads, T + extra, head_dim), zeros on the left."""
    return F.pad(tensor, (0, 0, extra, 0)) if extra else tensor


class BatchedCache:
    """``cache`` (a DynamicCache over the running rows), ``mask`` (B, T), ``lengths`` (B,)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.lengths = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def add(self, row_cache: DynamicCache, length: int) -> None:
        """Append one request whose cache holds exactly its ``length`` real tokens (batch 1)."""
        if self.cache is None or self.rows == 0:
            self.cache = row_cache
            self.mask = torch.ones(1, length, dtype=torch.long)
            self.lengths = torch.tensor([length])
            return
        width = max(self.width, length)
        for layer, new in zip(self.cache.layers, row_cache.layers, strict=True):
            layer.keys = torch.cat(
                [
                    _pad_time_left(layer.keys, width - self.width),
                    _pad_time_left(new.keys, width - length),
                ]
            )
            layer.values = torch.cat(
                [
                    _pad_time_left(layer.values, width - self.width),
                    _pad_time_left(new.values, width - length),
                ]
            )
        row_mask = torch.cat(
            [torch.zeros(width - length, dtype=torch.long), torch.ones(length, dtype=torch.long)]
        )
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), row_mask[None]])
        self.lengths = torch.cat([self.lengths, torch.tensor([length])])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop time columns that are now all padding."""
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.mask = self.mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        drop = self.width - int(self.lengths.max())
        self.mask = self.mask[:, drop:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, drop:]
            layer.values = layer.values.index_select(0, index)[:, :, drop:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``attention_mask`` (B, T + 1) and ``position_ids`` (B, 1) for one decode step."""
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        return mask, self.lengths[:, None].clone()

    def advance(self) -> None:
        """Record the column the decode step appended."""
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        self.lengths = self.lengths + 1
