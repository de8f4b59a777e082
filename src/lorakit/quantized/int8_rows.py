"""Weight-only int8 with one scale per output row: lorakit's own fast CPU base for serving.

``W0[i, :] = codes[i, :] * scale[i]``, codes int8 in [-127, 127], ``scale`` (out,) bfloat16
(``scale[i] = max_j |W[i, j]| / 127`` rounded to bfloat16, the codes rounded against that
rounded scale). The forward ``y = x W0^T + b`` runs torch's weight-only int8 kernel
``torch._weight_int8pack_mm`` on bfloat16 activations (the result is rounded to bfloat16, then
returned in ``x``'s dtype): at one token per step a decode reads a quarter of float32's weight
bytes, and the kernel is 3-7x faster than ``F.linear`` in float32 on one core (SmolLM2-135M's
linears; bfloat16's ``F.linear`` is no faster than float32 there, torchao's ``Int8Tensor`` and
bitsandbytes' LLM.int8 are slower). ``torch._weight_int8pack_mm`` is a private op (in torch
since 2.3, used by torchao and gpt-fast): shapes it is known to mishandle on the CPU (see
``kernel_applies``) and a torch without it take ``F.linear`` on the dequantized weight instead,
the same ``W0``.

``quantize_linears(model)`` replaces a model's ``nn.Linear`` modules (the output layer
included; not those the model's class keeps in float, e.g. T5's ``wo``) in place;
``load_model(spec, quantization="int8-rows")`` does it on load. The backward
pass (a LoRA adapter trained on this base) dequantizes again: ``dL/dx = dL/dy W0``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quantized.weight_only import WeightOnlyLinear, replace_linears

__all__ = [
    "Int8RowsLinear",
    "base_forward",
    "check",
    "dequantized_weight",
    "describe",
    "int8_rows_matmul",
    "kernel_applies",
    "quantize_linears",
    "requantize",
    "shape",
    "storage",
]

CODE_MAX = 127
HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")


def kernel_applies(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether ``torch._weight_int8pack_mm`` computes ``x (m, k) @ codes (n, k)^T`` correctly
    here: on the CPU, with n a multiple of 8 and k a multiple of 16. torch 2.13's CPU kernel
    crashes or returns garbage on some other shapes (n=5, k=7 or 8); within this rule it was
    right for every n in 8..576, k in 16..576 and 1..64 rows tried (to bfloat16's rounding).
    Every linear of the usual LLMs fits."""
    return HAS_KERNEL and x.device.type == "cpu" and _kernel_shape(codes)


def _kernel_shape(codes: torch.Tensor) -> bool:
    return codes.shape[0] % 8 == 0 and codes.shape[1] % 16 == 0


def int8_rows_matmul(x: torch.Tensor, module: Int8RowsLinear) -> torch.Tensor:
    """``x W0^T`` (..., out) for ``x`` (..., in): the int8 kernel on bfloat16 activations
    where it applies, else ``F.linear`` on the dequantized weight; in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1])  # (m, k)
    if module.kernel_shape and x.is_cpu:
        out = torch._weight_int8pack_mm(
            flat.to(torch.bfloat16).contiguous(), module.codes, module.scale
        )
    else:
        out = F.linear(flat, module.dequantized().to(x.dtype))
    return out.to(x.dtype).view(*x.shape[:-1], module.out_features)


class Int8RowsLinear(WeightOnlyLinear):
    """A frozen linear layer stored as int8 codes (out, in) and bfloat16 row scales (out,).

    Shapes: x (..., in) -> (..., out); ``bias`` (out,) float or None.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or scale.shape != codes.shape[:1]:
            raise ValueError(
                f"Int8RowsLinear needs int8 codes (out, in) and scales (out,); got "
                f"{codes.dtype} {tuple(codes.shape)} and {tuple(scale.shape)}"
            )
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.kernel_shape = HAS_KERNEL and _kernel_shape(codes)  # (checked once: every forward)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8RowsLinear:
        """Quantize a float ``weight`` (out, in): ``scale = max|row| / 127`` (bfloat16),
        ``codes = round(W / scale)`` clamped to [-127, 127] (a zero row: scale 1, codes 0)."""
        with torch.no_grad():
            weight = weight.detach().to(torch.float32)
            scale = (weight.abs().amax(dim=1) / CODE_MAX).to(torch.bfloat16)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round(weight / scale.to(torch.float32)[:, None])
            codes = codes.clamp(-CODE_MAX, CODE_MAX).to(torch.int8)
        return cls(codes, scale, bias)

    def dequantized(self) -> torch.Tensor:
        """``W0 = codes * scale`` (out, in) in float32 (exact: int8 times bfloat16).

        Scaled in place: one (out, in) float32 tensor, 4 out in bytes, is alive at a time (not
        the codes' float32 copy beside the product, 8 out in bytes: 226 MB for SmolLM2-135M's
        output layer, which backward rebuilds while the activations are alive), the same
        float32 products bit for bit."""
        weight = self.codes.to(torch.float32)
        return weight.mul_(self.scale.to(torch.float32)[:, None])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_rows_matmul(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"


def quantize_linears(model: nn.Module, keep: Collection[nn.Module] | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` (exact type) by an ``Int8RowsLinear`` of its
    weight, in place; returns how many. An output layer tied to the input embedding gets its
    own int8 copy (the embedding keeps the float weight). The layers in ``keep`` (None: those
    the model's class keeps in float, ``weight_only.kept_in_float``: T5's ``wo``) stay as
    they are."""
    return replace_linears(
        model, lambda linear: Int8RowsLinear.from_weight(linear.weight, linear.bias), keep
    )


# ----------------------------------------------------------------- the quantized-base protocol
def check(module: nn.Module) -> None:
    """Nothing to check: an ``Int8RowsLinear`` is usable as built."""


def shape(module: Int8RowsLinear) -> tuple[int, int]:
    return module.out_features, module.in_features


def describe(module: Int8RowsLinear) -> str:
    return "int8-rows"


def dequantized_weight(module: Int8RowsLinear) -> torch.Tensor:
    with torch.no_grad():
        return module.dequantized()


def base_forward(module: Int8RowsLinear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def storage(module: Int8RowsLinear) -> dict[str, torch.Tensor]:
    return {"codes": module.codes, "row_scales": module.scale}


def requantize(module: Int8RowsLinear, weight: torch.Tensor) -> Int8RowsLinear:
    """A new ``Int8RowsLinear`` (same bias) of ``weight`` (out, in) quantized afresh."""
    return Int8RowsLinear.from_weight(weight, module.bias)
