"""Dropout masks that are never stored: regenerated from a seed in the backward pass.

A mask for ``n`` elements is drawn as ``ceil(n / 4)`` 64-bit random words from a private
``torch.Generator`` seeded with ``seed``; each word gives four 16-bit lanes, and an element is
kept when its lane is at least ``drop_levels - 32768``. So each element is dropped independently
with probability ``drop_levels / 65536``: the requested ``p`` rounded to a multiple of 1/65536
(|error| <= 7.7e-6), and the rescale uses that same probability, so the branch is unbiased.
Drawing 16 random bits per element costs about a seventh of ``torch.bernoulli`` on CPU, which
makes regenerating the mask cheaper than storing it (``n`` bytes per adapted layer).
"""

from __future__ import annotations

import torch

__all__ = ["DROPOUT_LEVELS", "drop_levels", "drop_probability", "keep_mask", "new_seed"]

DROPOUT_LEVELS = 1 << 16  # resolution of the drop probability: 1 / 65536


def drop_levels(p: float) -> int:
    """``round(p * 65536)``: the drop probability in units of 1/65536."""
    return round(p * DROPOUT_LEVELS)


def drop_probability(levels: int) -> float:
    """The drop probability actually used for ``levels`` (``levels / 65536``)."""
    return levels / DROPOUT_LEVELS


def new_seed() -> int:
    """A fresh mask seed drawn from torch's default CPU generator (so ``torch.manual_seed``
    makes runs reproducible), without synchronising any accelerator."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item())


def keep_mask(
    shape: torch.Size | tuple[int, ...], levels: int, seed: int, device: torch.device
) -> torch.Tensor:
    """Boolean keep-mask of ``shape``: each element False with probability ``levels / 65536``.

    The same ``(shape, levels, seed, device)`` always gives the same mask.
    """
    numel = 1
    for size in shape:
        numel *= size
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=generator)
    lanes = words.view(torch.int16)[:numel]  # uniform over [-32768, 32767]
    return (lanes >= levels - (DROPOUT_LEVELS // 2)).view(shape)
