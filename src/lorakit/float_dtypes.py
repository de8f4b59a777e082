"""A model's float dtype: the one it computes in, a ``float_dtype`` argument checked, and every
float parameter cast to one (``merge_and_unload``'s result; ``lorakit.train.resume`` reads it).

The dtype a model computes in is read from its base weights, never from the adapters' tensors
(float32 on a half-precision base) nor from quantized layers (their bytes are not its dtype):
its input embeddings' weight dtype, else the dtype that holds most of its float base weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lorakit import quantized
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.state import walk_modules

__all__ = ["cast_floats", "check_float_dtype", "model_float_dtype", "unwrapped"]


def check_float_dtype(float_dtype: torch.dtype | None) -> None:
    """Refuse a ``float_dtype`` that is given but not a floating-point ``torch.dtype``
    (``ValueError``), before the model is changed."""
    if float_dtype is not None and not (
        isinstance(float_dtype, torch.dtype) and float_dtype.is_floating_point
    ):
        raise ValueError(
            f"float_dtype={float_dtype!r} is not a floating-point torch dtype; pass e.g. "
            "torch.bfloat16, or leave it out to keep the model's own dtype. Nothing was changed."
        )


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The float dtype ``model`` computes in, read from its base weights (adapter tensors and
    quantized layers do not count): its input embeddings' weight dtype, else the dtype holding
    most of its floating-point base weights; None if it has none (every weight quantized)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if callable(getter):
        try:
            embeddings = unwrapped(getter())
        except (AttributeError, NotImplementedError):  # a model without input embeddings
            embeddings = None
    weight = getattr(embeddings, "weight", None)
    if (
        isinstance(weight, torch.Tensor)
        and weight.is_floating_point()
        and not quantized.is_quantized(embeddings)
    ):
        return weight.dtype
    sizes: dict[torch.dtype, int] = {}
    for parameter in _base_parameters(model):
        if parameter.is_floating_point():
            sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else None


def unwrapped(module: nn.Module | None) -> nn.Module | None:
    """The original module under lorakit's wrappers (LoRA layers, saved-module copies)."""
    while isinstance(module, (LoraLayer, ModulesToSave)):
        module = module.base_layer if isinstance(module, LoraLayer) else module.original_module
    return module


def _base_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of the base model outside quantized layers: not the adapters' tensors nor
    the trained copies of ``modules_to_save``."""
    for _, module in walk_modules(model):
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, LoraLayer):
            continue  # the nested layer is walked itself
        base = unwrapped(module)
        recurse = base is not module  # a wrapper's base is not walked: take all of it
        for each in base.modules() if recurse else (base,):
            if not quantized.is_quantized(each):
                yield from each.parameters(recurse=False)


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter of ``model`` in ``dtype``, in place (buffers, such as
    rotary frequencies, keep theirs, as transformers loads them)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
