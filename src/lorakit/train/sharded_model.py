"""The refusal of a model that FSDP training left sharded, where lorakit needs whole tensors.

``lorakit.train.train`` with ``strategy="fsdp"`` shards the model in place and leaves it so: each
parameter is a ``DTensor`` holding this process's piece (``lorakit.train.fsdp``). Saving it
(``lorakit.save_adapter``) or training it again would compute on pieces (torch then fails deep
inside with "got mixed torch.Tensor and DTensor"); ``refuse_sharded`` says so first, in one
``UserError`` naming the way out: the run's own ``adapter/`` directory holds the whole adapter,
and ``lorakit.load_adapter`` loads it into a freshly built model.
"""

from __future__ import annotations

import sys

from torch import nn

from lorakit.errors import UserError

__all__ = ["refuse_sharded"]


def refuse_sharded(model: nn.Module, caller: str) -> nn.Module:
    """``model`` itself, or a ``UserError`` for ``caller`` (the function refusing, as the user
    called it) when a parameter of ``model`` is a ``DTensor`` (sharded by FSDP). Cheap where
    torch's ``DTensor`` module was never imported: no parameter can be one then."""
    tensor_module = sys.modules.get("torch.distributed.tensor")
    if tensor_module is None:
        return model
    sharded = next(
        (name for name, p in model.named_parameters() if isinstance(p, tensor_module.DTensor)),
        None,
    )
    if sharded is None:
        return model
    raise UserError(
        f"{caller}: the model is sharded by FSDP (parameter {sharded} is a DTensor holding one "
        "process's piece: train(..., TrainingConfig(strategy='fsdp')) leaves the model sharded); "
        "that run saved its whole adapter in its output directory's adapter/: use that "
        "directory, or load it (lorakit.load_adapter) into a freshly built model to save or "
        "train it again"
    )
