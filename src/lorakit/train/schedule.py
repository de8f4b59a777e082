"""Learning-rate schedule: linear warmup, then cosine decay.

For step ``t`` (0-based, counting optimizer steps), ``W`` warmup steps and ``T`` total steps::

    factor(t) = (t + 1) / W                                            for t < W
    factor(t) = m + (1 - m) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))   for t >= W

where ``m = min_lr_ratio``. The learning rate used by step ``t`` is ``lr * factor(t)``: it rises to
``lr`` at the end of warmup and falls towards ``m * lr``, which ``factor(T)`` would reach; the last
step run, ``T - 1``, uses ``factor(T - 1)``, a little above ``m`` (as transformers' cosine schedule,
which never reaches 0 either: ``T = 10, W = 1`` ends at 0.030 with ``m = 0``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["build_scheduler", "lr_factor", "warmup_steps_for"]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (formula above)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Explicit ``warmup_steps`` if given, else ``ceil(warmup_ratio * total_steps)``."""
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return math.ceil(warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``lr_factor`` to every param group (each keeps its own base lr,
    so LoRA+'s higher B learning rate follows the same curve)."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
