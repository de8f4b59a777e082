"""Exact parameter accounting, printed in PEFT's words.

Per adapted (d x k) matrix LoRA trains ``r * (d + k)`` parameters (``functional.lora_parameter_count``);
here the totals are counted from the model's real tensors, so rank patterns, biases and
``modules_to_save`` are all included. Works on models built on the ``meta`` device.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ParameterCount", "count_parameters", "print_trainable_parameters"]


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        """PEFT's line: ``trainable params: 39,976,960 || all params: ... || trainable%: 0.5898``."""
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.percent:.4f}"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters (each shared tensor counted once, as ``parameters()`` does)."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return ParameterCount(trainable=trainable, total=total)


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    """Print PEFT's one-line summary and return the counts."""
    counts = count_parameters(model)
    print(counts)
    return counts
