"""``LoraLinear``: LoRA beside an ``nn.Linear`` or a transformers ``Conv1D``.

``h = W0 x + s B A x`` with A (r, k) and B (d, r), for either layout of ``W0``: (d, k) for
``nn.Linear``, (k, d) for ``Conv1D`` (detected from the type, no flag needed). The adapter keys are
PEFT's: ``<path>.lora_A.<adapter>.weight`` (r, k) and ``<path>.lora_B.<adapter>.weight`` (d, r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
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

    def _create_adapter(
        self,
        adapter_name: str,
        rank: int,
        init: bool | str | None,
        dtype: torch.dtype,
        values: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        if values is not None:  # taken over as they are
            self.lora_A[adapter_name], self.lora_B[adapter_name] = map(_factor, values)
            return
        device = self.base_layer.weight.device
        if init is None:  # values are about to be copied in (loading a file): allocate only
            lora_A = _factor(torch.empty(rank, self.in_features, device=device, dtype=dtype))
            lora_B = _factor(torch.empty(self.out_features, rank, device=device, dtype=dtype))
        else:
            lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
            lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        if init is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / rank)
            nn.init.zeros_(lora_B.weight)
        # init False: nn.Linear's own random init for both (B != 0), for tests.
        self.lora_A[adapter_name] = lora_A
        self.lora_B[adapter_name] = lora_B

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

    def fused_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor | None:
        base = self.base_layer
        if not adapter_names or not (type(base) is nn.Linear or self.fan_in_fan_out):
            return None
        if not fast.module_is_plain(base):
            return None
        adapters = []
        for name in adapter_names:
            dropout = self.dropouts[name] if self.training else 0.0
            adapter = fast.rank_side(
                self.lora_A[name].weight, self.lora_B[name].weight, self.scalings[name], dropout
            )
            if adapter is None:
                return None
            adapters.append(adapter)
        return fast.fused_lora_linear(x, base.weight, base.bias, adapters, self.fan_in_fan_out)

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        if self.fan_in_fan_out:  # Conv1D: x @ W + b with W (k, d)
            out = x @ weight
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)
