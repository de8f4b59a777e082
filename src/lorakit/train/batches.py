"""Which examples go into which step: a deterministic plan, so that a resumed run sees exactly
the batches the interrupted one would have seen, and every DDP process its share of them.

Epoch ``e`` draws everything from its own generator seeded ``seed + e`` (the global RNG, used by
dropout, is not touched). With ``G = batch_size * grad_accum * world_size`` (the global batch)::

    order   = randperm(n)                          a fresh random order of the examples
    full    = order[: n - n % G]                   the rest, n % G examples, is the short batch
    batches = lorakit.data.length_grouped_batches(lengths of full, G, seed + epoch, bucket_batches):
              shuffled, chunks of G * bucket_batches sorted by length, cut into global
              batches of G, the batches shuffled
    epoch   = those global batches, then the short batch (if kept)

so a global batch holds examples of similar length (little padding) while the order of batches,
and which examples meet, changes every epoch. Without ``lengths`` (or ``bucket_batches=0``) the
chunks are not sorted: a plain shuffle. Optimizer step ``t`` consumes global batch
``t mod steps_per_epoch`` of epoch ``t // steps_per_epoch``. Under DDP the short batch is
dropped (``drop_last``), so every process always has the same number of non-empty
micro-batches, and the full batches are the same as in a single process with the same ``G``.
A global batch is split into ``grad_accum`` micro-batches (contiguous, so also of similar
length); process ``rank`` takes a contiguous slice of each micro-batch.

Whether the short batch is kept changes the epoch's length, hence which batch a step takes, so
``identity`` names it when there is one: a checkpoint of one process resumed under torchrun (or
the reverse) follows the checkpoint's choice where it can (``splits_short_batch``; see
``lorakit.train.resume.resumed_drop_last``) and is refused otherwise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.data.batching import pad_right
from lorakit.errors import UserError

__all__ = [
    "BatchOrder",
    "check_one_global_batch",
    "example_lengths",
    "examples_sha256",
    "pad_collate",
    "padding_fraction",
    "shortest_first",
]

Batch = dict[str, torch.Tensor]
LengthOf = Callable[[Any], int]
TokensOf = Callable[[Any], tuple[Sequence[int], Sequence[int]]]


@dataclass(frozen=True)
class BatchOrder:
    """The example indices of every micro-batch of every optimizer step.

    ``lengths[i]``: token count of example ``i`` (``None``: unknown, plain shuffle).
    ``bucket_batches``: how many global batches of a random chunk are sorted by length together
    (more: less padding, less randomness in which examples share a batch; 0: plain shuffle).
    """

    num_examples: int
    batch_size: int
    grad_accum: int = 1
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False  # drop the short global batch (used by DDP)
    lengths: tuple[int, ...] | None = None
    bucket_batches: int = 50
    _epochs: dict[int, list[list[int]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.lengths is not None and len(self.lengths) != self.num_examples:
            raise ValueError(f"{len(self.lengths)} lengths for {self.num_examples} examples")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def by_length(self) -> bool:
        return self.shuffle and self.lengths is not None and self.bucket_batches > 0

    @property
    def short_batch(self) -> int:
        """How many examples are left over after the full global batches (``n mod G``)."""
        return self.num_examples % self.global_batch

    @property
    def splits_short_batch(self) -> bool:
        """Whether each micro-batch of the short batch gives examples to every process or to
        none, so that processes keeping it run the same number of forward and backward passes
        (DDP and FSDP need that). Always in one process, and when there is no short batch."""
        short = list(range(self.short_batch))
        shares = [self._split(short, rank) for rank in range(self.world_size)]
        return all(
            len({bool(share[micro]) for share in shares}) == 1 for micro in range(self.grad_accum)
        )

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_examples // self.global_batch
        return math.ceil(self.num_examples / self.global_batch)

    def examples_before(self, step: int) -> int:
        """How many examples steps ``0 .. step - 1`` hold together (every process): whole
        epochs, then full global batches (the short batch is an epoch's last one)."""
        epochs, position = divmod(step, self.steps_per_epoch)
        per_epoch = self.num_examples - (self.short_batch if self.drop_last else 0)
        return epochs * per_epoch + position * self.global_batch

    def identity(self) -> dict[str, Any]:
        """What decides the batches (saved in checkpoints; resume requires the same)."""
        lengths = None
        if self.by_length:  # other lengths (e.g. another max_length) give other batches
            encoded = ",".join(map(str, self.lengths)).encode()
            lengths = hashlib.sha256(encoded).hexdigest()[:16]
        return {
            "num_examples": self.num_examples,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "batches": f"by length, chunks of {self.bucket_batches}"
            if self.by_length
            else "shuffle",
            "lengths_sha256": lengths,
            **self._short_batch_identity(),
        }

    def _short_batch_identity(self) -> dict[str, str]:
        """``{"short_batch": "kept (k of n examples)"}`` (or "dropped ...") when there is a short
        batch; nothing otherwise (then dropping it changes nothing, and checkpoints of one
        process and of torchrun stay interchangeable)."""
        if not self.short_batch:
            return {}
        what = "dropped" if self.drop_last else "kept"
        return {"short_batch": f"{what} ({self.short_batch} of {self.num_examples} examples)"}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``, in the order the steps take them (cached)."""
        if epoch not in self._epochs:
            self._epochs.clear()  # one epoch at a time is all the loop needs
            self._epochs[epoch] = self._plan_epoch(epoch)
        return self._epochs[epoch]

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        size, n = self.global_batch, self.num_examples
        if not self.shuffle:
            return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        cut = n - n % size
        full, rest = order[:cut], order[cut:]
        if self.by_length:  # lorakit.data's length buckets, on whole global batches
            from lorakit.data.batching import length_grouped_batches

            full_lengths = [self.lengths[i] for i in full]
            planned = length_grouped_batches(
                full_lengths, size, seed=self.seed + epoch, bucket_batches=self.bucket_batches
            )
            batches = [[full[j] for j in batch] for batch in planned]
        else:
            batches = [full[start : start + size] for start in range(0, cut, size)]
        if rest and not self.drop_last:
            batches.append(rest)
        return batches

    def step_indices(self, step: int) -> list[int]:
        """All example indices (every process, every micro-batch) of optimizer step ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[position]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (lists of indices) that process ``rank`` runs at
        ``step``. Empty lists are possible in the short batch at the end of an epoch."""
        return self._split(self.step_indices(step), rank)

    def _split(self, indices: list[int], rank: int) -> list[list[int]]:
        """Process ``rank``'s slice of each of the ``grad_accum`` micro-batches of the global
        batch ``indices`` (contiguous micro-batches, contiguous slices)."""
        per_micro = math.ceil(len(indices) / self.grad_accum)
        result = []
        for micro in range(self.grad_accum):
            chunk = indices[micro * per_micro : (micro + 1) * per_micro]
            per_rank = math.ceil(len(chunk) / self.world_size)
            result.append(chunk[rank * per_rank : (rank + 1) * per_rank])
        return result


def check_one_global_batch(order: BatchOrder) -> None:
    """``UserError`` when ``order`` has no step: its ``n`` examples are fewer than one global
    batch ``G`` and the short batch is dropped (``drop_last``, as under torchrun), so
    ``steps_per_epoch = n // G = 0``. Depends on the settings and the example count only: the
    command checks it before the model loads (and before ``--overwrite`` deletes a run). The
    advice names only what helps: the batch flags above 1, and fewer processes."""
    if order.steps_per_epoch:
        return
    raise UserError(
        f"{order.num_examples} training examples are fewer than one global batch "
        f"({order.global_batch} = batch_size {order.batch_size} x grad_accum "
        f"{order.grad_accum} x {order.world_size} processes), and the examples left over "
        "after whole global batches are dropped, as under torchrun: no optimizer step would "
        f"be left. {_ways_to_one_global_batch(order)}"
    )


def _ways_to_one_global_batch(order: BatchOrder) -> str:
    """What gives ``order`` (``n < G``) a step: ``--batch-size`` / ``--grad-accum`` where above
    1; fewer processes, at most ``n // (batch_size x grad_accum)`` where that is 2 or more (they
    drop the short batch too), else one process (it keeps it); more examples."""
    flags = [
        f"--{name}"
        for name, value in (("batch-size", order.batch_size), ("grad-accum", order.grad_accum))
        if value > 1
    ]
    ways = [f"lower {' or '.join(flags)}"] if flags else []
    fitting = order.num_examples // (order.batch_size * order.grad_accum)
    if fitting >= 2:
        ways.append(f"start at most {fitting} processes (torchrun --nproc-per-node {fitting})")
    elif order.world_size > 1:
        ways.append("train in one process (it keeps the short batch)")
    text = ", ".join(ways) + (", or " if ways else "") + "give more examples"
    return text[0].upper() + text[1:]


def example_lengths(examples: Sequence[Any], length_of: LengthOf | None) -> tuple[int, ...] | None:
    """``length_of`` of every example; by default ``len(example["input_ids"])`` when every
    example is a mapping with ``input_ids``; else None (lengths unknown)."""
    if length_of is None:
        if not all(isinstance(e, Mapping) and "input_ids" in e for e in examples):
            return None
        return tuple(len(example["input_ids"]) for example in examples)
    return tuple(int(length_of(example)) for example in examples)


def examples_sha256(examples: Sequence[Any], tokens_of: TokensOf | None) -> str | None:
    """The first 16 hex digits of the sha256 of every example's tokens, in order:
    ``sha256(concat_i [len(ids_i), ids_i, len(labels_i), labels_i])`` as int64 bytes, where
    ``(ids_i, labels_i) = tokens_of(example_i)``; by default ``input_ids`` and ``labels``
    (``input_ids`` where absent, as ``pad_collate``) when every example is a mapping with
    ``input_ids``; else None (contents unknown). Other data, or the same data cut at another
    ``max_length``, gives another digest (a resumed run must train on the checkpoint's)."""
    if tokens_of is None:
        if not all(isinstance(e, Mapping) and "input_ids" in e for e in examples):
            return None

        def tokens_of(example):
            return example["input_ids"], example.get("labels", example["input_ids"])

    digest = hashlib.sha256()
    for example in examples:
        for tokens in tokens_of(example):
            values = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)  # (T,)
            framed = torch.cat([torch.tensor([values.numel()]), values])  # (1 + T,)
            digest.update(framed.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def shortest_first(examples: Sequence[Any], length_of: LengthOf | None) -> list[int]:
    """Indices of ``examples`` shortest first when lengths are known (evaluation order: batches
    of similar length), else in order."""
    lengths = example_lengths(examples, length_of)
    order = list(range(len(examples)))
    return order if lengths is None else sorted(order, key=lambda i: lengths[i])


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padding tokens when each batch is padded to its longest example:
    ``sum_b (|b| * max_{i in b} len_i - sum_{i in b} len_i) / sum_b |b| * max_{i in b} len_i``."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return (padded - real) / padded if padded else 0.0


def pad_collate(pad_token_id: int) -> Callable[[Sequence[dict[str, Any]]], Batch]:
    """A collate function for examples ``{"input_ids": [...], "labels": [...]}`` (labels
    optional, -100 = no loss): right-pads to the longest example and adds ``attention_mask``
    (``lorakit.data.pad_right``, the padding of ``lorakit.data.collate`` too).

    Output shapes: ``input_ids``, ``attention_mask``, ``labels`` all (batch, longest).
    """

    def collate(examples: Sequence[dict[str, Any]]) -> Batch:
        ids = [example["input_ids"] for example in examples]
        labels = [
            example.get("labels", tokens) for example, tokens in zip(examples, ids, strict=True)
        ]
        return pad_right(ids, labels, pad_token_id)

    return collate
