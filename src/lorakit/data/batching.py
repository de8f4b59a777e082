"""Length-bucketed batches with padding.

``length_grouped_batches`` decides which examples go together (indices only: cheap to recompute, so a
resumed run or each data-parallel rank can skip or slice batches exactly); ``collate`` pads them
(``pad_right``, also behind ``lorakit.train.pad_collate``)::

    input_ids       (B, T)  long   pad_token_id after each sequence (right padding)
    attention_mask  (B, T)  long   1 on real tokens, 0 on padding
    labels          (B, T)  long   -100 on padding and on tokens that are not learnt

with T the longest sequence in the batch. ``pad_left`` builds left-padded prompts for
next-token scoring and generation (the last column is every prompt's last token);
``forward_arguments`` says which optional inputs (``position_ids``, ``logits_to_keep``) a model
takes, looking through its wrappers.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE_INDEX, TokenizedData
from lorakit.errors import UserError

__all__ = [
    "batches",
    "collate",
    "forward_arguments",
    "innermost_model",
    "length_grouped_batches",
    "pad_left",
    "pad_right",
]


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    bucket_batches: int = 8,
    drop_last: bool = False,
) -> list[list[int]]:
    """Index batches grouped by length, deterministic for a given ``seed``.

    With ``shuffle``: the indices are permuted (``random.Random(seed)``), cut into chunks of
    ``batch_size * bucket_batches``, each chunk is sorted by length (stable) and cut into batches,
    and the batches are shuffled together. Without: the same without either permutation.
    Similar lengths share a batch (little padding) while the order stays random. For a new order
    each epoch pass ``seed + epoch``. ``drop_last`` leaves out the ``len(lengths) % batch_size``
    examples that come last in the (shuffled) order before anything is sorted, so the examples
    left out are random ones, not the longest of the last chunk.
    """
    if batch_size < 1 or bucket_batches < 1:
        raise UserError(
            f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}"
        )
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if drop_last:
        del order[len(order) - len(order) % batch_size :]
    chunk_size = batch_size * bucket_batches
    planned: list[list[int]] = []
    for chunk_start in range(0, len(order), chunk_size):
        chunk = sorted(order[chunk_start : chunk_start + chunk_size], key=lambda i: lengths[i])
        planned += [chunk[start : start + batch_size] for start in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(planned)
    return planned


def collate(data: TokenizedData, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded tensors for the examples ``indices`` (``pad_right``; shapes in the module
    docstring); the keys are exactly the model's ``forward`` arguments, so
    ``model(**batch).loss`` works."""
    return pad_right(
        [data.input_ids[i] for i in indices], [data.labels[i] for i in indices], data.pad_token_id
    )


def pad_right(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The one right-padding of training batches: ``input_ids``, ``attention_mask`` and
    ``labels``, each (B, T) long with T the longest sequence; after each sequence come
    ``pad_token_id``, mask 0 and label -100. ``labels[i]`` has the length of ``input_ids[i]``."""
    width = max(len(ids) for ids in input_ids)
    padded_ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    padded_labels = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
        length = len(ids)
        padded_ids[row, :length] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        padded_labels[row, :length] = torch.as_tensor(row_labels, dtype=torch.long)
    return {"input_ids": padded_ids, "attention_mask": attention_mask, "labels": padded_labels}


def batches(
    data: TokenizedData,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    bucket_batches: int = 8,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """``collate`` over ``length_grouped_batches(data.lengths, ...)`` (same arguments, same order)."""
    plan = length_grouped_batches(
        data.lengths,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        bucket_batches=bucket_batches,
        drop_last=drop_last,
    )
    for indices in plan:
        yield collate(data, indices)


def pad_left(
    sequences: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T), padded on the left.

    Models with absolute or rotary positions should get
    ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` so each prompt starts at 0.
    """
    if not sequences or any(len(ids) == 0 for ids in sequences):
        raise UserError("pad_left needs at least one sequence and no empty sequence")
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def innermost_model(model: nn.Module) -> nn.Module:
    """The model under its wrappers, whose ``forward`` has the real arguments: through
    ``get_base_model()`` (lorakit's and PEFT's ``PeftModel``), ``.module`` (DDP, FSDP) and
    ``._orig_mod`` (``torch.compile``), as many times as they are nested."""
    while True:
        if callable(getattr(type(model), "get_base_model", None)):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def forward_arguments(model: nn.Module) -> frozenset[str]:
    """The parameter names of ``innermost_model(model).forward`` (a wrapper's ``forward(*args,
    **kwargs)`` passes them on, but its own signature does not name them)."""
    return frozenset(inspect.signature(innermost_model(model).forward).parameters)
