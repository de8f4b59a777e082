"""Fused DoRA linear layer: base, rank-r branch and the per-row DoRA scale in one pass.

One DoRA adapter (``lorakit.functional``: ``f = m / n``, n detached), ``c = s / (1 - p)``,
``mask`` the 0/1 dropout keep-mask of x (``lorakit.fast.dropout``), ``u = A (x * mask)`` (N, r)
and ``P = W0 x~`` (N, d) with ``x~ = x * mask / (1 - p)``::

    h = W0 x + b + (f - 1) * P + f * c * B u       (f scales the output features, d)

Without dropout ``x~ = x``, so ``P`` is the base product itself and ``h = f * P + c (f B) u + b``:
one (N, k) x (k, d) product, as for LoRA, plus one pass over the (N, d) output. With dropout
``P`` is a second product (PEFT's semantics: DoRA scales ``W0`` applied to the dropped input).

Saved for backward: x (only if A trains), ``P`` (N, d, for ``dL/dm``), ``u`` (N, r), the mask's
bits, ``f`` and ``n`` (d; the ``n`` that ``f`` divides by, ``functional.dora_divisor``: rounded
to a 16-bit m's dtype). Gradients, with ``G = dL/dh`` (N, d)::

    g     = c G (f B)                                   (N, r)
    dL/dx = (f G) W0 + g A                              without dropout
          = G W0 + mask * ((f - 1) G W0 / (1 - p) + g A)   with dropout
    dL/dA = g^T (x * mask),   dL/dB = c f * (G^T u)
    dL/dm = (colsum(G * P) + c rowsum(B * G^T u)) / n,     dL/db = colsum(G)

The node trains only adapters in x's dtype (``fast._dora_applies``): fp32 DoRA adapters on a
bf16 base train on the plain path (``functional.lora_forward``, products in bf16), where dL/dA,
dL/dB and dL/dm have bf16 accuracy (2e-3 to 6e-3 against float64; peft's dL/dA, dL/dB 5e-7).

Inference (no autograd) takes any mix of LoRA and DoRA adapters without dropout:
``h = (1 + sum_DoRA (f_a - 1)) * (W0 x) + b + sum_a c_a (f_a B_a) A_a x`` (``f_a = 1`` for LoRA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lorakit import functional
from lorakit.fast.dropout import (
    drop_probability,
    multiplier,
    new_seed,
    pack_mask,
    unpack_mask,
)
from lorakit.fast.linear import (
    RankSide,
    as_dtype,
    base_input_grad,
    dropout_mask,
    linear_output,
    node_output,
    refuse_double_backward,
)

__all__ = ["DoraSide", "FusedDoraLinear", "dora_linear_inference", "fused_dora_linear"]


class DoraSide(NamedTuple):
    """A DoRA adapter for the fast path: its ``RankSide``, the magnitude ``m`` (d,), the
    detached row norms ``n`` (d,) of ``W0 + s B A``, and ``scales(dtype)``: ``(f - 1, f B)`` in
    ``dtype`` for inference (the layer caches them; ``layers.dora.RowNorms``)."""

    side: RankSide
    magnitude: torch.Tensor
    norms: torch.Tensor
    scales: Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def _scaled_rows(lora_B: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``f B`` (d, r) in ``dtype`` (each output row of B times its factor)."""
    return (lora_B.to(factor.dtype) * factor[:, None]).to(dtype)


class FusedDoraLinear(torch.autograd.Function):
    """The training node for one DoRA adapter (formulas in the module docstring). Non-tensor
    arguments: ``rank_scale`` (c), ``drop_levels``, ``seed``, ``fan_in_fan_out``."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        norms: torch.Tensor,
        rank_scale: float,
        drop_levels: int,
        seed: int,
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        dtype = x.dtype
        x_rows = x.reshape(-1, x.shape[-1])  # (N, k)
        factor = functional.dora_factor(magnitude.detach(), norms)  # (d,)
        divisor = functional.dora_divisor(magnitude, norms)  # the n f divides by, for dL/dm
        mask = dropout_mask(x_rows, drop_levels, seed)
        if mask is None:
            product = linear_output(x_rows, weight, None, fan_in_fan_out)  # P = W0 x (N, d)
            out = product * as_dtype(factor, dtype)
            if bias is not None:
                out.add_(bias)
            kept = x_rows
        else:
            kept = x_rows * multiplier(mask, dtype)  # temporary (N, k)
            keep = 1.0 - drop_probability(drop_levels)
            product = linear_output(kept, weight, None, fan_in_fan_out).div_(keep)  # P = W0 x~
            out = linear_output(x_rows, weight, bias, fan_in_fan_out)
            out.addcmul_(product, as_dtype(factor - 1.0, dtype))
        low_rank = F.linear(kept, as_dtype(lora_A, dtype))  # u (N, r)
        out.addmm_(low_rank, _scaled_rows(lora_B, factor, dtype).T, alpha=rank_scale)
        keep_x = x if ctx.needs_input_grad[3] else None
        needs_mask = mask is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3])
        mask_bits = pack_mask(mask) if needs_mask else None
        saved = (keep_x, weight, lora_A, lora_B, factor, divisor, product, low_rank, mask_bits)
        ctx.save_for_backward(*saved)  # (the mask too: saved-tensor hooks see every byte)
        ctx.m_dtype = magnitude.dtype
        ctx.x_shape = x.shape
        ctx.settings = (rank_scale, drop_levels, fan_in_fan_out)
        return node_output(out, x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        refuse_double_backward("DoRA linear node")
        x, weight, lora_A, lora_B, factor, norms, product, low_rank, mask_bits = ctx.saved_tensors
        rank_scale = ctx.settings[0]
        needs_x, _, needs_bias, needs_A, needs_B, needs_m = ctx.needs_input_grad[:6]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d)
        dtype = grad_rows.dtype
        mask = None
        if mask_bits is not None:
            bits = unpack_mask(mask_bits, (grad_rows.shape[0], ctx.x_shape[-1]))
            mask = multiplier(bits, dtype)
        grad_u = grad_rows.T @ low_rank  # G^T u (d, r)
        grad_low_rank = (grad_rows @ _scaled_rows(lora_B, factor, dtype)).mul_(rank_scale)
        grad_x = grad_A = grad_B = grad_m = grad_bias = None
        if needs_A:
            x_rows = x.reshape(-1, x.shape[-1])
            kept = x_rows if mask is None else x_rows * mask
            grad_A = (grad_low_rank.T @ kept).to(lora_A.dtype)
        if needs_B:
            grad_B = (grad_u.to(factor.dtype) * factor[:, None] * rank_scale).to(lora_B.dtype)
        if needs_m:
            along_base = (grad_rows * product).sum(dim=0)  # (d,)
            along_lora = (lora_B.to(dtype) * grad_u).sum(dim=1) * rank_scale  # (d,)
            grad_m = ((along_base + along_lora).to(norms.dtype) / norms).to(ctx.m_dtype)
        if needs_x:
            grad_x = _input_grad(grad_rows, weight, lora_A, factor, grad_low_rank, mask, ctx)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None, None, None, None, None


def _input_grad(grad_rows, weight, lora_A, factor, grad_low_rank, mask, ctx) -> torch.Tensor:
    """``dL/dx`` (module docstring), shaped like x."""
    _, drop_levels, fan_in_fan_out = ctx.settings
    dtype = grad_rows.dtype
    lora_A = as_dtype(lora_A, dtype)
    if mask is None:
        scaled = grad_rows * as_dtype(factor, dtype)  # f G (N, d)
        grad_x = base_input_grad(scaled, weight, fan_in_fan_out).addmm_(grad_low_rank, lora_A)
    else:
        keep = 1.0 - drop_probability(drop_levels)
        scaled = grad_rows * as_dtype((factor - 1.0) / keep, dtype)  # (f - 1) G / (1 - p)
        dropped_part = base_input_grad(scaled, weight, fan_in_fan_out).addmm_(grad_low_rank, lora_A)
        grad_x = base_input_grad(grad_rows, weight, fan_in_fan_out).addcmul_(dropped_part, mask)
    return grad_x.view(ctx.x_shape)


def fused_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapter: DoraSide,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """One DoRA adapter with autograd (``FusedDoraLinear``)."""
    lora_A, lora_B, rank_scale, levels = adapter.side
    seed = new_seed() if levels else 0
    return FusedDoraLinear.apply(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        adapter.magnitude,
        adapter.norms,
        rank_scale,
        levels,
        seed,
        fan_in_fan_out,
    )


def dora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[RankSide | DoraSide],
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """``(1 + sum_DoRA (f_a - 1)) * (W0 x) + b + sum_a c_a (f_a B_a) A_a x`` without autograd
    (no dropout: see ``lorakit.fast._training``): one fresh (..., d) output, updated in place."""
    dtype = x.dtype
    x_rows = x.reshape(-1, x.shape[-1])  # (N, k)
    out = linear_output(x_rows, weight, None, fan_in_fan_out)  # (N, d)
    gain = None  # sum over DoRA adapters of (f - 1)
    rows_out = []
    for adapter in adapters:
        if isinstance(adapter, DoraSide):
            adapter_gain, scaled_B = adapter.scales(dtype)
            gain = adapter_gain if gain is None else gain + adapter_gain
            rows_out.append((adapter.side, scaled_B))
        else:
            rows_out.append((adapter, as_dtype(adapter.lora_B, dtype)))
    if gain is not None:
        out.addcmul_(out, gain)  # out * (1 + gain): f - 1 keeps its precision in bf16
    if bias is not None:
        out.add_(bias)
    for side, lora_B in rows_out:
        low_rank = F.linear(x_rows, as_dtype(side.lora_A, dtype))  # (N, r)
        out.addmm_(low_rank, lora_B.T, alpha=side.rank_scale)
    return out.view(*x.shape[:-1], out.shape[-1])
