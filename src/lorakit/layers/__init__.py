"""LoRA layers. Each wraps the original module as ``base_layer``; ``wrap`` picks the class.

Dispatch is a table of (predicate, class), first match wins, so new layer types are one line.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lorakit import quantized
from lorakit.errors import TargetModulesError
from lorakit.layers.base import LoraLayer
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear, is_conv1d, linear_shape
from lorakit.layers.parameter import LoraParameter
from lorakit.layers.per_call import (
    adapter_override,
    current_override,
    current_router,
    row_router,
)
from lorakit.layers.quantized_linear import QuantizedLoraLinear
from lorakit.layers.saved import ModulesToSave
from lorakit.layers.tokens import TrainableTokens

__all__ = [
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraParameter",
    "ModulesToSave",
    "QuantizedLoraLinear",
    "TrainableTokens",
    "UnsupportedModuleError",
    "adapter_override",
    "current_override",
    "current_router",
    "is_conv1d",
    "is_linear",
    "layer_class_for",
    "linear_shape",
    "row_router",
    "wrap",
]


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, transformers' ``Conv1D`` or a quantized linear layer lorakit knows (what
    "all-linear" selects)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or quantized.is_quantized(module)


_DISPATCH: list[tuple[Callable[[nn.Module], bool], type[LoraLayer]]] = [
    (quantized.is_quantized, QuantizedLoraLinear),
    (is_linear, LoraLinear),
    (lambda module: isinstance(module, nn.Embedding), LoraEmbedding),
]


class UnsupportedModuleError(TargetModulesError):
    """A target module of a type no LoRA layer wraps (a norm, a rotary embedding, a whole
    attention or MoE block): a ``ValueError``, as PEFT's "Target module ... is not supported"."""


def layer_class_for(module: nn.Module, module_name: str) -> type[LoraLayer]:
    """The LoRA layer class that wraps ``module`` (its own class when it is a LoRA layer
    already); ``UnsupportedModuleError`` (a ``TargetModulesError``, so a ``ValueError`` as in
    PEFT) naming the module and its type if none does (``UnsupportedQuantizedLayerError`` for a
    quantized layer of a format lorakit does not know). A ``LoraParameter`` (a module whose bare
    parameter another adapter adapts, ``target_parameters``) is no ``target_modules`` target:
    ``TargetModulesError`` naming it."""
    if isinstance(module, LoraParameter):
        raise TargetModulesError(
            f"module {module_name!r} is named by target_modules, but it is not a linear or "
            f"embedding layer: its parameter {module.parameter_name!r} is adapted through "
            "target_parameters by another adapter. Name that parameter in target_parameters "
            f"(e.g. {module_name}.{module.parameter_name}), or drop {module_name!r} from "
            "target_modules."
        )
    if isinstance(module, LoraLayer):
        return type(module)
    quantized.check_supported(module, module_name)
    for accepts, layer_class in _DISPATCH:
        if accepts(module):
            return layer_class
    supported = (
        "nn.Linear, transformers Conv1D, nn.Embedding, the quantized linears of lorakit.quantized"
    )
    raise UnsupportedModuleError(
        f"module {module_name!r} is a {type(module).__module__}.{type(module).__qualname__}, "
        f"which lorakit cannot adapt (supported: {supported}). Remove it from target_modules "
        "or add it to exclude_modules."
    )


def wrap(module: nn.Module, module_name: str) -> LoraLayer:
    """A new LoRA layer wrapping ``module`` (no adapters yet)."""
    return layer_class_for(module, module_name)(module)
