"""Gradient checkpointing on a transformers model (``enable_gradient_checkpointing``): its
blocks' activations are recomputed in backward (non-reentrant) instead of kept, trading compute
for memory, with the inputs of the first block made to require grad so that a frozen embedding
still passes gradients to the adapters after it."""

from __future__ import annotations

from torch import nn

from lorakit.errors import UserError

__all__ = ["enable_gradient_checkpointing"]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant), trading compute for memory. Inputs of
    the first block are made to require grad so that frozen embeddings still pass gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "config"):
        model.config.use_cache = False
