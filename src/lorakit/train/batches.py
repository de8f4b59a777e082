"""Which examples go into which step: a deterministic plan, so that a resumed run sees exactly
the batches the interrupted one would have seen.

Epoch ``e`` visits the examples in the order of ``torch.randperm(n)`` drawn from a generator
seeded with ``seed + e`` (its own generator: the global RNG, used by dropout, is not touched).
The order is cut into global batches of ``batch_size * grad_accum * world_size`` examples (a
shorter last one is kept); optimizer step ``t`` consumes global batch ``t mod steps_per_epoch``
of epoch ``t // steps_per_epoch``. Under DDP the short last batch is dropped (``drop_last``) so
every process always has the same number of non-empty micro-batches. A global batch is split into ``grad_accum`` micro-batches per
process; process ``rank`` takes a contiguous slice of each micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BatchPlan", "pad_collate"]

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BatchPlan:
    """The example indices of every micro-batch of every optimizer step."""

    num_examples: int
    batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False  # drop a last global batch smaller than the others (used by DDP)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_examples // self.global_batch
        return math.ceil(self.num_examples / self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def step_indices(self, step: int) -> list[int]:
        """All example indices (every process, every micro-batch) of optimizer step ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (lists of indices) that process ``rank`` runs at
        ``step``. Empty lists are possible at the end of an epoch with few examples left."""
        indices = self.step_indices(step)
        per_micro = math.ceil(len(indices) / self.grad_accum)
        result = []
        for micro in range(self.grad_accum):
            chunk = indices[micro * per_micro : (micro + 1) * per_micro]
            per_rank = math.ceil(len(chunk) / self.world_size)
            result.append(chunk[rank * per_rank : (rank + 1) * per_rank])
        return result


def pad_collate(pad_token_id: int) -> Callable[[Sequence[dict[str, Any]]], Batch]:
    """A collate function for examples ``{"input_ids": [...], "labels": [...]}`` (labels
    optional, -100 = no loss): right-pads to the longest example and adds ``attention_mask``.

    Output shapes: ``input_ids``, ``attention_mask``, ``labels`` all (batch, longest).
    """

    def collate(examples: Sequence[dict[str, Any]]) -> Batch:
        longest = max(len(example["input_ids"]) for example in examples)
        ids, mask, labels = [], [], []
        for example in examples:
            tokens = list(example["input_ids"])
            padding = longest - len(tokens)
            ids.append(tokens + [pad_token_id] * padding)
            mask.append([1] * len(tokens) + [0] * padding)
            labels.append(list(example.get("labels", tokens)) + [-100] * padding)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    return collate
