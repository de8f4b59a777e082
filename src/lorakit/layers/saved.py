"""``ModulesToSave``: a module trained in full beside LoRA (e.g. a new classification head).

Like PEFT: the original module is kept frozen as ``original_module`` and each adapter owns a
trainable copy in ``modules_to_save[adapter]``. The active adapter's copy runs the forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.layers.per_call import current_override

__all__ = ["ModulesToSave"]


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
