"""``LoraLinear``: LoRA beside an ``nn.Linear`` or a transformers ``Conv1D``.

``h = W0 x + s B A x`` with A (r, k) and B (d, r), for either layout of ``W0``: (d, k) for
``nn.Linear``, (k, d) for ``Conv1D`` (detected from the type, no flag needed). The adapter keys are
PEFT's: ``<path>.lora_A.<adapter>.weight`` (r, k) and ``<path>.lora_B.<adapter>.weight`` (d, r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lorakit import fast, functional
from lorakit.layers.base import LoraLayer

__all__ = ["LoraLinear", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer whose weight is stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


def _factor(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight`` (out, in) as its Parameter, built without
    ``nn.Linear.__init__``: its random draw would be thrown away, and when loading adapters
    building hundreds of modules the usual way costs more than reading the file."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.__dict__.update(out_features=weight.shape[0], in_features=weight.shape[1])
    linear.register_parameter("weight", nn.Parameter(weight))
    linear.register_parameter("bias", None)
    return linear


class LoraLinear(LoraLayer):
    """LoRA for ``nn.Linear`` and ``Conv1D``: ``h = base(x) + sum_a s_a B_a A_a dropout(x)``.

    Shapes: x (..., k) -> h (..., d); ``lora_A[a].weight`` (r, k), ``lora_B[a].weight`` (d, r).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str) -> None:
        """True: A kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r^2), B = 0; False: both
        kaiming-uniform (B != 0, for tests). Both are first drawn as ``nn.Linear(k, r)`` and
        ``nn.Linear(r, d)`` would draw them (as PEFT's layers do), so a seed gives the values it
        always gave."""
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        if init is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            nn.init.zeros_(lora_B)
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
            nn.init.zeros_(lora_B)

    def store_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        self.lora_A[adapter_name] = _factor(lora_A)
        self.lora_B[adapter_name] = _factor(lora_B)

    def _delete_adapter_tensors(self, adapter_name: str) -> None:
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]

    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (rank, self.in_features), (self.out_features, rank)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return functional.delta_weight(
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scalings[adapter_name],
            fan_in_fan_out=self.fan_in_fan_out,
        )

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return functional.lora_forward(
            x,
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scalings[adapter_name],
            dropout=self.dropouts[adapter_name],
            training=self.training,
        )

    def base_is_plain(self) -> bool:
        base = self.base_layer
        return (type(base) is nn.Linear or self.fan_in_fan_out) and fast.module_is_plain(base)

    def fast_adapters(
        self, x: torch.Tensor, weight: torch.Tensor, adapters: Sequence[str]
    ) -> list[fast.RankSide] | None:
        if not self.base_is_plain():
            return None
        fast_adapters = []
        for name in adapters:
            dropout = self.dropouts[name] if self.training else 0.0
            adapter = fast.rank_side(
                self.lora_A[name].weight, self.lora_B[name].weight, self.scalings[name], dropout
            )
            if adapter is None:
                return None
            fast_adapters.append(adapter)
        if not fast.applies(x, weight, self.base_layer.bias, fast_adapters):
            return None
        return fast_adapters

    def fast_output(
        self, x: torch.Tensor, weight: torch.Tensor, fast_adapters: list[fast.RankSide]
    ) -> torch.Tensor:
        bias = self.base_layer.bias
        return fast.fused_lora_linear(x, weight, bias, fast_adapters, self.fan_in_fan_out)

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return fast.linear_output(x, weight, self.base_layer.bias, self.fan_in_fan_out)
