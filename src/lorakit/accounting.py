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
    """Trainable and total parameters (each shared tensor counted once, as ``parameters()`` does).

    A quantized weight counts the numbers it stands for, as PEFT counts them: a bitsandbytes
    ``Params4bit`` packs two 4-bit values a byte of its storage, and lorakit's own quantized
    layers (int8 rows, int4 groups, GGUF blocks) hold their weight in buffers, counted at their
    ``(out, in)`` shape."""
    trainable = total = 0
    for parameter in model.parameters():
        numel = _logical_numel(parameter)
        total += numel
        if parameter.requires_grad:
            trainable += numel
    return ParameterCount(trainable=trainable, total=total + _buffer_held_weights(model))


def _logical_numel(parameter: nn.Parameter) -> int:
    """The numbers ``parameter`` holds: a ``Params4bit`` two per byte of its storage."""
    if type(parameter).__name__ == "Params4bit":
        return parameter.numel() * 2 * parameter.element_size()
    return parameter.numel()


def _buffer_held_weights(model: nn.Module) -> int:
    """The numbers of the quantized weights held in buffers, not parameters (lorakit's own
    quantized layers), each stored weight counted once (layer replication shares them)."""
    from lorakit import quantized

    counted: dict[tuple, int] = {}  # by the storages held: replicated layers share them
    for module in model.modules():
        if quantized.is_quantized(module) and module._parameters.get("weight") is None:
            held = tuple(_storage_key(tensor) for tensor in quantized.storage(module).values())
            out_features, in_features = quantized.shape(module)  # (no weight Parameter)
            counted[held] = out_features * in_features
    return sum(counted.values())


def _storage_key(tensor) -> tuple[int, int]:
    """Which storage ``tensor`` views, and where: the identity of its storage (not its address,
    ``data_ptr()``, which is 0 for every tensor on the ``meta`` device) and its offset."""
    return tensor.untyped_storage()._cdata, tensor.storage_offset()


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    """Print PEFT's one-line summary and return the counts."""
    counts = count_parameters(model)
    print(counts)
    return counts
