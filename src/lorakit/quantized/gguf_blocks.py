"""GGUF quantized blocks as a frozen linear base: ``GGUFLinear`` holds the packed bytes of a
GGUF tensor (its memory IS those bytes) and dequantizes them on the fly in every forward.

Block formats (llama.cpp's ``ggml``), 32 weights per block along a row (the input dimension),
with ``d`` and ``m`` float16 and the nibbles of byte ``j`` giving weights ``j`` (low) and
``j + 16`` (high):

=======  =====  ===========================================  ===============================
type     bytes  layout                                       value of weight ``i``
=======  =====  ===========================================  ===============================
Q4_0     18     ``d``, 16 bytes of nibbles                   ``d * (q_i - 8)``
Q4_1     20     ``d``, ``m``, 16 bytes of nibbles            ``d * q_i + m``
Q8_0     34     ``d``, 32 int8                               ``d * q_i``
=======  =====  ===========================================  ===============================

computed in float32 (the same operations, in the same order, as the ``gguf`` package's numpy
reference, so the two agree bit for bit). Any other block type is refused, naming it.

The backward pass dequantizes again instead of saving the (out, in) float weight: autograd keeps
only the packed bytes, which the module holds anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BLOCK_FORMATS",
    "BLOCK_SIZE",
    "BlockFormat",
    "GGUFLinear",
    "base_forward",
    "block_format",
    "check",
    "dequantize_blocks",
    "dequantized_weight",
    "describe",
    "requantize",
    "shape",
    "storage",
]

BLOCK_SIZE = 32  # weights per block, for every supported type


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block type: its name, ``GGMLQuantizationType`` number and bytes per block."""

    name: str
    type_id: int
    block_bytes: int


BLOCK_FORMATS: dict[str, BlockFormat] = {
    fmt.name: fmt
    for fmt in (BlockFormat("Q4_0", 2, 18), BlockFormat("Q4_1", 3, 20), BlockFormat("Q8_0", 8, 34))
}


def block_format(name: str, tensor_name: str = "a tensor") -> BlockFormat:
    """The format called ``name``; ``UnsupportedQuantizedLayerError`` naming the tensor if none."""
    from lorakit.quantized import UnsupportedQuantizedLayerError

    if name not in BLOCK_FORMATS:
        raise UnsupportedQuantizedLayerError(
            f"{tensor_name} is stored as GGUF block type {name}, which lorakit cannot "
            f"dequantize (supported: {', '.join(BLOCK_FORMATS)}); re-quantize the GGUF file "
            "to one of these (llama.cpp's llama-quantize) or use the float model"
        )
    return BLOCK_FORMATS[name]


def _half(columns: torch.Tensor) -> torch.Tensor:
    """Two bytes per block (..., 2) read as one little-endian float16, returned as float32 (..., 1)."""
    return columns.contiguous().view(torch.float16).to(torch.float32)


def dequantize_blocks(packed: torch.Tensor, block_type: str) -> torch.Tensor:
    """The float32 weight (rows, 32 * blocks) held by ``packed`` (rows, blocks * block_bytes)
    uint8 bytes of ``block_type`` (Q4_0, Q4_1 or Q8_0; see the module docstring)."""
    fmt = block_format(block_type)
    rows = packed.shape[0]
    blocks = packed.reshape(rows, -1, fmt.block_bytes)  # (rows, n_blocks, block_bytes)
    scale = _half(blocks[..., 0:2])  # (rows, n_blocks, 1)
    if fmt.name == "Q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).to(torch.float32)  # (.., 32)
        return (scale * codes).reshape(rows, -1)
    nibbles = blocks[..., 4:] if fmt.name == "Q4_1" else blocks[..., 2:]  # (rows, n_blocks, 16)
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # (rows, n_blocks, 32)
    if fmt.name == "Q4_0":
        return (scale * (codes.to(torch.float32) - 8.0)).reshape(rows, -1)
    minimum = _half(blocks[..., 2:4])  # (rows, n_blocks, 1)
    return (scale * codes.to(torch.float32) + minimum).reshape(rows, -1)


class _DequantizingMatmul(torch.autograd.Function):
    """``y = x W^T`` with ``W = dequantize(packed)`` built in forward and again in backward
    (``dL/dx = dL/dy W``); only ``packed`` is saved. The weight is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, block_type: str) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.block_type = block_type
        return F.linear(x, dequantize_blocks(packed, block_type).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (packed,) = ctx.saved_tensors
        weight = dequantize_blocks(packed, ctx.block_type).to(grad_output.dtype)
        return grad_output @ weight, None, None  # (..., out) @ (out, in) -> (..., in)


class GGUFLinear(nn.Module):
    """A frozen linear layer stored as GGUF blocks: ``y = x dequant(packed)^T + b``.

    ``packed``: uint8 (out_features, in_features / 32 * block_bytes), a buffer (saved with the
    model's state dict, never trained); ``bias``: optional float (out_features,), a frozen
    ``Parameter`` (as ``nn.Linear``'s: an adapter with ``bias="all"`` trains it).
    Shapes: x (..., in_features) -> (..., out_features), in ``x``'s dtype.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        block_type: str,
        in_features: int,
        bias: torch.Tensor | None = None,
        tensor_name: str = "a tensor",
    ) -> None:
        super().__init__()
        fmt = block_format(block_type, tensor_name)
        if in_features % BLOCK_SIZE:
            raise ValueError(
                f"{tensor_name}: in_features {in_features} is not a multiple of {BLOCK_SIZE}"
            )
        row_bytes = in_features // BLOCK_SIZE * fmt.block_bytes
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row_bytes:
            raise ValueError(
                f"{tensor_name}: packed {block_type} data must be uint8 of shape (out, "
                f"{row_bytes}) for in_features={in_features}, got {packed.dtype} "
                f"{tuple(packed.shape)}"
            )
        self.block_type = block_type
        self.in_features = in_features
        self.out_features = packed.shape[0]
        self.register_buffer("packed", packed)
        # a frozen Parameter, as in nn.Linear: bias="all" / "lora_only" can train it
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizingMatmul.apply(x, self.packed, self.block_type)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block_type={self.block_type}, bias={self.bias is not None}"
        )


# ----------------------------------------------------------------- the backend protocol
def check(module: nn.Module) -> None:
    block_format(module.block_type)


def shape(module: GGUFLinear) -> tuple[int, int]:
    return module.out_features, module.in_features


def describe(module: GGUFLinear) -> str:
    return f"gguf-{module.block_type}"


def dequantized_weight(module: GGUFLinear) -> torch.Tensor:
    return dequantize_blocks(module.packed, module.block_type)


def base_forward(module: GGUFLinear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def storage(module: GGUFLinear) -> dict[str, torch.Tensor]:
    return {"packed": module.packed}


def requantize(module: GGUFLinear, weight: torch.Tensor) -> GGUFLinear:
    """A new ``GGUFLinear`` of the same block type holding ``weight`` (out, in) quantized
    afresh by the ``gguf`` package's reference quantizer (numpy)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    quant_type = GGMLQuantizationType[module.block_type]
    values = weight.detach().to(torch.float32).cpu().numpy()
    packed = torch.from_numpy(np.ascontiguousarray(quants.quantize(values, quant_type)))
    bias = None if module.bias is None else module.bias.detach().clone()
    return GGUFLinear(packed.to(module.packed.device), module.block_type, module.in_features, bias)
