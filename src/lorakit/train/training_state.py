"""``TrainingState``: what a checkpoint keeps of the model and optimizer, as whole tensors
(built by ``lorakit.train.checkpoint.training_state``, or under FSDP by
``lorakit.train.fsdp.ShardedSaver``; written by ``lorakit.train.checkpoint``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrainingState"]


@dataclass
class TrainingState:
    """What a checkpoint keeps of the model and optimizer, as whole tensors: ``trainable``
    ``{model key: tensor}``, ``optimizer`` an ``optimizer.state_dict()``, and
    ``write_adapter(directory)``, which writes the adapter in PEFT format."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    write_adapter: Callable[[Path], object]
