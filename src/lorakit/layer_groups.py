"""How a report groups and sizes LoRA layers (``lorakit plan``'s module-type table).

A layer on a module is grouped by the module's last name component (``q_proj``) and adapts the
module's own parameters (weight and bias). A ``LoraParameter`` (``target_parameters``) is grouped
by its parameter's name (``down_proj``; ``gate.weight`` where the name alone is generic) and
adapts that one tensor only: not its module's other parameters, nor the nested layers of its
other targeted parameters (which sit inside its ``base_layer``).
"""

from __future__ import annotations

from torch import nn

from lorakit.layers.parameter import LoraParameter

__all__ = ["adapted_size", "layer_group"]

_GENERIC_NAMES = ("weight", "bias")


def layer_group(path: str, layer: nn.Module) -> str:
    """The group of the LoRA layer ``layer`` at ``path`` (see the module docstring)."""
    if not isinstance(layer, LoraParameter):
        return path.rsplit(".", 1)[-1]
    if layer.parameter_name in _GENERIC_NAMES:
        return ".".join(layer.parameter_path(path).rsplit(".", 2)[-2:])
    return layer.parameter_name


def adapted_size(layer: nn.Module) -> int:
    """The number of base parameters ``layer`` adapts (see the module docstring)."""
    if isinstance(layer, LoraParameter):
        return layer.live_weight().numel()
    return sum(p.numel() for p in layer.base_layer.parameters())
