"""Fused LoRA beside a quantized frozen base (QLoRA): ``h = base(x) + c * B (A (x * mask))`` in one
autograd node.

The same node as ``lorakit.fast.linear.FusedLoraLinear`` with the base run by its own kernel
(``lorakit.quantized.base_forward``: bitsandbytes 4-/8-bit, torchao int8, GGUF blocks, int8 rows,
int4 groups) and no graph recorded for it. With ``G = dL/dh`` (N, d) and ``g = c G B`` (N, r)::

    dL/dx = G dequant(W0) + mask * (g A)
    dL/dA = g^T (x * mask)          dL/dB = c G^T u,  u = A (x * mask) (N, r)

The base's input gradient ``G dequant(W0)`` is computed in backward from a dequantized weight
(d, k) that lives only for that product, exactly as the backend's own backward computes it, so the
node gives the plain path's (and PEFT's) gradients bit for bit (``_base_weight``): torchao's, GGUF,
int8-rows and int4-groups layers multiply G in x's dtype by ``dequant(W0)`` cast to it;
bitsandbytes' ``MatMul4Bit`` multiplies in the layer's ``compute_dtype`` (a float32 model with
``bnb_4bit_compute_dtype=torch.bfloat16`` gets a bfloat16 product, cast back), and
``MatMul8bitFp`` / ``MatMul8bitLt`` by ``CB * (SCB / 127)`` (``lorakit.quantized.bnb``'s
``backward_weight``).

Kept for backward: x once (only if A trains), u, the dropout mask as ``lorakit.fast.dropout``
saves it (bits, gaps or nothing), never a dropout copy of x and never a dequantized weight. The
masks are drawn exactly as the float fast path draws them (one seed a call), so a run on a
quantized base and a run on the float model it came from draw the same dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import quantized
from lorakit.fast.dropout import InputMask, input_mask
from lorakit.fast.linear import (
    as_dtype,
    input_grad,
    node_output,
    rank_side_backward,
    refuse_double_backward,
)

__all__ = ["FusedQuantizedLoraLinear"]


class FusedQuantizedLoraLinear(torch.autograd.Function):
    """The training node. Arguments: x (..., k), the quantized ``base_layer`` (its bias, if
    any, is frozen and inside its kernel), A (r, k), B (d, r), ``rank_scale`` (c),
    ``drop_levels`` and ``seed`` of the dropout mask. Returns h (..., d) in x's dtype."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        rank_scale: float,
        drop_levels: int,
        seed: int,
    ) -> torch.Tensor:
        x_rows = x.reshape(-1, x.shape[-1])  # (N, k)
        out = quantized.base_forward(base_layer, x_rows).to(x.dtype)  # (N, d), a fresh tensor
        mask = input_mask(x_rows.shape, drop_levels, seed, x.device, x.dtype)
        kept = x_rows if mask is None else mask.kept(x_rows)
        low_rank = F.linear(kept, as_dtype(lora_A, x.dtype))  # (N, r)
        out.addmm_(low_rank, as_dtype(lora_B, x.dtype).T, alpha=rank_scale)
        keep_x = x if ctx.needs_input_grad[2] else None
        needs_mask = mask is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[2])
        ctx.save_for_backward(
            keep_x, lora_A, lora_B, low_rank, mask.saved() if needs_mask else None
        )
        ctx.base_layer = base_layer
        ctx.x_shape = x.shape
        ctx.settings = (rank_scale, drop_levels, seed)
        return node_output(out, x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        refuse_double_backward("quantized LoRA node")
        x, lora_A, lora_B, low_rank, mask_bits = ctx.saved_tensors
        needs_x, _, needs_A, needs_B = ctx.needs_input_grad[:4]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d)
        mask, grad_low_rank, grad_A, grad_B = rank_side_backward(
            ctx, grad_rows, x, low_rank, lora_A, lora_B, mask_bits, (needs_x, needs_A, needs_B)
        )
        grad_x = None
        if needs_x:
            grad_low_rank = as_dtype(grad_low_rank, grad_rows.dtype)
            grad_x = _input_grad(ctx.base_layer, grad_rows, grad_low_rank, lora_A, mask)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, grad_A, grad_B, None, None, None


def _base_weight(
    base_layer: nn.Module, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.dtype]:
    """``(W, dtype)``: ``dequant(W0)`` (d, k) as the base's own backward multiplies the output
    gradient (of ``grad_dtype``) by it, and the dtype of that product. A backend whose backward
    does more than cast ``dequantized_weight`` to the gradient's dtype says how
    (``backward_weight``: bitsandbytes); for the others it is that cast, in ``grad_dtype``."""
    own = getattr(quantized.backend_for(base_layer), "backward_weight", None)
    if own is not None:
        return own(base_layer, grad_dtype)
    return as_dtype(quantized.dequantized_weight(base_layer), grad_dtype), grad_dtype


def _input_grad(
    base_layer: nn.Module,
    grad_rows: torch.Tensor,
    grad_low_rank: torch.Tensor,
    lora_A: torch.Tensor,
    mask: InputMask | None,
) -> torch.Tensor:
    """``dL/dx = G dequant(W0) + mask * (g A)`` (N, k) in G's dtype, for G (N, d), g (N, r).

    Where the backend multiplies in G's dtype, ``linear.input_grad`` adds the two terms in one
    GEMM, as before. Where it multiplies in another dtype (a bfloat16 ``compute_dtype`` under a
    float32 model), ``G W`` is computed in that dtype and cast back, as the backend's backward
    does, then the rank-r term (in G's dtype) is added to it, as autograd sums the two paths."""
    weight, dtype = _base_weight(base_layer, grad_rows.dtype)  # (d, k), only for this product
    if dtype == grad_rows.dtype:
        return input_grad(grad_rows, weight, False, grad_low_rank, lora_A, mask)
    base_grad = (as_dtype(grad_rows, dtype) @ weight).to(grad_rows.dtype)  # (N, k)
    del weight
    lora_A = as_dtype(lora_A, grad_rows.dtype)
    if mask is None:
        return base_grad.addmm_(grad_low_rank, lora_A)
    return mask.zero_dropped_(grad_low_rank @ lora_A).add_(base_grad)
