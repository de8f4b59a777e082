"""``LoraLinear``: LoRA beside an ``nn.Linear`` or a transformers ``Conv1D``.

``h = W0 x + s B A x`` with A (r, k) and B (d, r), for either layout of ``W0``: (d, k) for
``nn.Linear``, (k, d) for ``Conv1D`` (detected from the type, no flag needed). The adapter keys are
PEFT's: ``<path>.lora_A.<adapter>.weight`` (r, k) and ``<path>.lora_B.<adapter>.weight`` (d, r),
and ``<path>.lora_B.<adapter>.bias`` (d,) for an adapter with a bias on B (``lora_bias=True``:
``h = W0 x + bias0 + s (B A x + b)``; merging adds ``s b`` to the base bias, a new Parameter, the
original kept aside for an exact unmerge). DoRA adapters are the ``LinearDora`` part of the class
(``layers/linear_dora.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lorakit import fast, functional, quantized
from lorakit.fast.linear import as_dtype
from lorakit.init_factors import orthogonal_factors
from lorakit.layers.base import LoraLayer
from lorakit.layers.dora import RowNorms
from lorakit.layers.linear_dora import LinearDora
from lorakit.layers.lora_bias import LoraBiases, LoraBiasMixin
from lorakit.layers.parameter import LinearFactors

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


class LoraLinear(LinearDora, LoraBiasMixin, LinearFactors, LoraLayer):
    """LoRA for ``nn.Linear`` and ``Conv1D``: ``h = base(x) + sum_a s_a B_a A_a dropout(x)``.

    Shapes: x (..., k) -> h (..., d); ``lora_A[a].weight`` (r, k), ``lora_B[a].weight`` (d, r).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only (layers/dora.py)
        self.row_norms = RowNorms()

    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str) -> None:
        """True: A kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r^2), B = 0; False: both
        kaiming-uniform (B != 0, for tests); "orthogonal": PEFT's orthogonal A and B with
        B A = 0 (``init_factors.orthogonal_factors``; an even rank, a float base); "eva",
        "pissa*", "olora": A as drawn, B = 0 (set later from data or W0). Both are first drawn
        as ``nn.Linear(k, r)`` and ``nn.Linear(r, d)`` would draw them (as PEFT's layers do), so
        a seed gives the values it always gave. On a float16/bfloat16 base ``_new_factors`` then
        rounds the True / False / "gaussian" / "orthogonal" factors through the base dtype, so
        that a seed gives PEFT's factors there too; the from-W0 and from-data inits are not
        rounded."""
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        if init == "orthogonal":
            self._refuse_orthogonal_on_quantized()
            rank = lora_A.shape[0]
            values = orthogonal_factors(rank, self.in_features, self.out_features, lora_A.device)
            lora_A.copy_(values[0])
            lora_B.copy_(values[1])
        elif init is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            nn.init.zeros_(lora_B)
        elif init is not False and init != "gaussian":  # "eva", "pissa*", "olora": B = 0 until
            nn.init.zeros_(lora_B)  # set from data or from W0 (PEFT draws A once, as here)
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
            nn.init.zeros_(lora_B)

    def _refuse_orthogonal_on_quantized(self) -> None:
        """``ValueError`` for init "orthogonal" on a quantized base: PEFT casts the factors to
        the stored weight's dtype there and fails (bitsandbytes 4-bit: "Only Tensors of
        floating point ... can require gradients"), so a file saved with it would not load in
        peft either."""
        base = self.base_layer
        if quantized.is_quantized(base):
            raise ValueError(
                f"init_lora_weights='orthogonal' on a quantized {type(base).__name__} "
                f"({quantized.describe(base)}, shape {self.out_features} x {self.in_features}): "
                "peft implements it for float nn.Linear / Conv1D layers only (it fails on a "
                "quantized one, also when it loads a file that says 'orthogonal'). Use "
                "init_lora_weights=True, or remove the quantized modules from target_modules "
                "(or add them to exclude_modules)."
            )

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to()``, ``.half()``, ``.float()``), then forget the
        cached DoRA norms: a conversion can put changed values at the old address and version
        (a round trip through bf16), where the cache would not see them (``layers.dora``)."""
        result = super()._apply(fn, recurse)
        self.row_norms.clear()
        return result

    def _delete_adapter_tensors(self, adapter_name: str) -> None:
        super()._delete_adapter_tensors(adapter_name)  # A and B (``LinearFactors``)
        if self.is_dora(adapter_name):
            del self.lora_magnitude_vector[adapter_name]
            self.row_norms.clear(adapter_name)

    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (rank, self.in_features), (self.out_features, rank)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """``[A, B]``, then DoRA's magnitude ``m`` for a DoRA adapter, then the bias ``b`` on B
        for a ``lora_bias`` adapter."""
        parameters = [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]
        if self.is_dora(adapter_name):
            parameters.append(self.lora_magnitude_vector[adapter_name].weight)
        if self.lora_bias_of(adapter_name) is not None:
            parameters.append(self.lora_bias_of(adapter_name))
        return parameters

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s B A`` laid out like the base weight, in ``functional.merge_dtype`` of its dtype
        (float32; float64 on a float64 base, so a merge there is exact to float64)."""
        return functional.delta_weight(
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scalings[adapter_name],
            fan_in_fan_out=self.fan_in_fan_out,
            dtype=functional.merge_dtype(self.base_float_dtype),
        )

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return functional.lora_forward(
            x,
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scalings[adapter_name],
            dropout=self.dropouts[adapter_name],
            training=self.training,
            lora_bias=self.lora_bias_of(adapter_name),
        )

    def add_adapter_(
        self,
        out: torch.Tensor,
        adapter_name: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        base_out: torch.Tensor,
    ) -> torch.Tensor:
        """``out += s (x A^T) B^T`` in three ops (``functional.add_lora_forward_``: the add
        fused into the second product) for a plain LoRA adapter with no dropout in effect and
        ``out`` of ``x``'s dtype; the general ``adapter_branch`` otherwise. Inference only (no
        gradient recorded, a plain base's output): the unmerged forward over a quantized base,
        whose fused path is for training, and the calls the fused path leaves to the plain
        formula (e.g. under autocast). Shapes: out (..., d), x (..., k)."""
        factor_B = self.lora_B[adapter_name]
        plain = factor_B.bias is None and not self.is_dora(adapter_name)
        dropping = self.training and self.dropouts[adapter_name] > 0.0
        if not plain or dropping or out.dtype != x.dtype or not out.is_contiguous():
            return super().add_adapter_(out, adapter_name, x, weight, base_out)
        functional.add_lora_forward_(
            out.view(-1, self.out_features),
            x.reshape(-1, self.in_features),
            as_dtype(self.lora_A[adapter_name].weight, x.dtype),
            as_dtype(factor_B.weight, x.dtype).t(),
            self.scalings[adapter_name],
        )
        return out

    def base_is_plain(self) -> bool:
        base = self.base_layer
        return (type(base) is nn.Linear or self.fan_in_fan_out) and fast.module_is_plain(base)

    def fast_adapters(
        self, x: torch.Tensor, weight: torch.Tensor, adapters: Sequence[str]
    ) -> list[fast.RankSide | fast.DoraSide] | None:
        if not self.base_is_plain():
            return None
        with_bias = [self.lora_bias_of(name) is not None for name in adapters]
        if any(with_bias) and any(map(self.is_dora, adapters)):
            return None  # the fused DoRA path takes the base bias alone
        fast_adapters = []
        for name in adapters:
            dropout = self.dropouts[name] if self.training else 0.0
            adapter = fast.rank_side(
                self.lora_A[name].weight, self.lora_B[name].weight, self.scalings[name], dropout
            )
            if adapter is None:
                return None
            if self.is_dora(name):
                adapter = self._dora_side(name, adapter, weight)
            fast_adapters.append(adapter)
        if not fast.applies(x, weight, self.original_bias, fast_adapters):
            return None
        if len(fast_adapters) > 1 and self._lora_biases_train(adapters):
            return None  # a bias on B that trains makes the call training: one adapter only
        if any(with_bias):  # the biases on B join the base bias: one addmm, gradients included
            names = tuple(name for name in adapters if self.lora_bias_of(name) is not None)
            return [*fast_adapters, LoraBiases(names)]
        return fast_adapters

    def _lora_biases_train(self, adapters: Sequence[str]) -> bool:
        """A bias on B of ``adapters`` records a gradient in this call."""
        biases = [self.lora_bias_of(name) for name in adapters]
        return torch.is_grad_enabled() and any(b is not None and b.requires_grad for b in biases)

    def fast_output(
        self, x: torch.Tensor, weight: torch.Tensor, fast_adapters: list
    ) -> torch.Tensor:
        bias = self.original_bias
        if fast_adapters and isinstance(fast_adapters[-1], LoraBiases):
            *fast_adapters, biases = fast_adapters
            bias = self.bias_with_lora_biases(bias, biases.names, x.dtype)
        return fast.fused_lora_linear(x, weight, bias, fast_adapters, self.fan_in_fan_out)

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return fast.linear_output(x, weight, self._bias_for(weight), self.fan_in_fan_out)
