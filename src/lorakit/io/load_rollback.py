"""Putting a model back after a load changed it: ``merge_again`` derives the merged weights of
layers that had adapters merged again from their base tensors as they are now (after a load
wrote a file's base tensors into them, or after a failure put the old values back), and
``roll_back`` undoes a load that failed part-way (``io.load._apply``): the old base values
back, those merged weights derived again, the new adapter and any wrapper it added removed, so
the model is exactly what it was before the load.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorakit.inject import unload
from lorakit.layers import LoraLayer
from lorakit.state import adapter_configs, delete_adapter, lora_layers, saved_modules
from lorakit.targets import original_module
from lorakit.wrapped_modules import replace_module

__all__ = ["merge_again", "roll_back"]


def merge_again(merged: Iterable[tuple[LoraLayer, tuple[str, ...]]]) -> None:
    """For each ``(layer, names)`` of ``merged`` (a layer and the adapters it had merged before
    the load): unmerge the layer and merge ``names`` again, in that order; its merged weight
    (and bias) then follow its base tensors as they are now."""
    for layer, names in merged:
        layer.unmerge()
        layer.merge(names)


def roll_back(model, adapter_name, had_state, wrapped_before, base_backup, remerge=()) -> None:
    """Undo ``io.load``'s ``_apply``: old base values back (and the merged weights of
    ``remerge``, the merged layers whose base tensors were written, derived from them again),
    the adapter and any new wrapper removed."""
    with torch.no_grad():
        for target, old_value in base_backup:
            target.copy_(old_value)
    merge_again(remerge)
    if adapter_name not in adapter_configs(model):
        return
    if not had_state:
        unload(model)
        return
    delete_adapter(model, adapter_name)
    for name, layer in reversed(list(lora_layers(model))):  # nested layers first
        if id(layer) not in wrapped_before:
            replace_module(model, name, layer.base_layer)
    for name, wrapper in list(saved_modules(model)):
        if id(wrapper) not in wrapped_before:
            replace_module(model, name, original_module(wrapper))
