"""``ModulesToSave``: a module trained in full beside LoRA (e.g. a new classification head).

Like PEFT: the original module is kept frozen as ``original_module`` and each adapter owns a
trainable copy in ``modules_to_save[adapter]``. The active adapter's copy runs the forward.
A quantized layer (``lorakit.quantized``), or a module holding one, cannot be saved this way:
its weight is quantized storage, which no optimizer step can train (``check_saveable``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit import quantized
from lorakit.layers.per_call import current_override

__all__ = ["ModulesToSave", "check_saveable"]


def check_saveable(module: nn.Module, name: str) -> None:
    """``ValueError`` if ``module`` (a ``modules_to_save`` entry of the model, at ``name``) is or
    holds a quantized layer: a full trainable copy of quantized storage trains nothing (its
    codes are integers, or a tensor subclass no optimizer steps), or bitsandbytes refuses to
    give it gradients. Changes nothing."""
    original = module.original_module if isinstance(module, ModulesToSave) else module
    for inner_name, inner in original.named_modules():
        if quantized.is_quantized(inner):
            try:
                kind = f"quantized as {quantized.describe(inner)}"
            except quantized.UnsupportedQuantizedLayerError:  # e.g. a bnb layer repacked
                kind = f"a quantized {type(inner).__name__}"
        else:
            reason = quantized.looks_quantized(inner)
            if reason is None:
                continue
            kind = f"which looks quantized: {reason}"
        where = (
            f"{name!r} is a layer {kind}"
            if not inner_name
            else f"{name!r} holds {inner_name!r}, a layer {kind}"
        )
        raise ValueError(
            f"modules_to_save: {where}. A full trainable copy of quantized storage cannot "
            "train (nothing would change, or bitsandbytes refuses gradients). Adapt it with "
            "LoRA instead (put it in target_modules, and take it out of modules_to_save), or "
            "load the base unquantized to train it in full. Nothing was changed."
        )


class ModulesToSave(nn.Module):
    """Per-adapter full copies of one module; the first active adapter that has a copy wins."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save)

    def add_adapter(self, adapter_name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        for parameter in trainable.parameters():
            parameter.requires_grad_(True)
        self.modules_to_save[adapter_name] = trainable

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter_name)

    def chosen_module(self) -> nn.Module:
        override = current_override(self)
        active = self.active_adapters if override is None else override
        for name in active:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.chosen_module()(*args, **kwargs)
