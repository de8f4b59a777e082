"""Fused LoRA linear layer: ``h = W0 x + b + c * B (A (x * mask))`` in one autograd node.

``c = s / (1 - p)`` (``functional.rank_side_scale``) is applied to the rank-r side; ``mask`` is the
0/1 dropout keep-mask of the input of A (all ones without dropout), drawn from a seed and kept
as bits for the backward pass (``lorakit.fast.dropout``). Shapes: x (..., k), W0 (d, k)
(``nn.Linear``) or (k, d) (``Conv1D``, ``fan_in_fan_out``), A (r, k), B (d, r), h (..., d).

What the node keeps for backward: x (once, and only if A trains: the frozen base needs only W0),
the (N, r) rank-r product ``u = A (x * mask)``, the mask (N k / 8 bytes of bits; for
``p <= 1/8`` on CPU, where it is the drops' positions, the int16 steps between them, about
2 p N k bytes, for 2^-10 <= p <= 1/16; outside that range nothing: drawn again from the
seed) and the parameters. Gradients, with
``G = dL/dh`` (N, d) and ``g = c * G B`` (N, r)::

    dL/dx = G W0 + mask * (g A)        (without dropout g A accumulated into G W0; with it
                                        G W0 accumulated into the masked g A by the GEMM)
    dL/dA = g^T (x * mask)
    dL/dB = c * G^T u
    dL/db = sum over rows of G

Matmuls run in x's dtype: fp32 adapters on a bf16 model are cast to bf16 (r (d + k) numbers),
never the activation to fp32. The gradients of wider (fp32) adapters are accumulated in fp32 from
row chunks cast on the fly (``adapter_grads``), without an fp32 copy of a whole activation.
Their accuracy on a bf16 base (max error / max value against the float64 formula, r = 8): dL/dA
about 4e-7 (fp32), from G, B and x; dL/dB about 2e-3 (bf16; peft, which casts x to fp32: 2e-6),
because ``u = A (x * mask)`` is computed from the bf16-rounded A and saved in bf16; dL/db (the
base bias, or a ``lora_bias`` folded into it) about 2e-3, the column sum of G in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lorakit.fast.dropout import InputMask, input_mask, keep_mask, new_seed, restored_mask

__all__ = [
    "FusedLoraLinear",
    "RankSide",
    "linear_output",
    "lora_linear_inference",
    "node_output",
    "refuse_double_backward",
]


def refuse_double_backward(node: str) -> None:
    """Raise where a fused node's backward is itself being differentiated (``create_graph=True``:
    gradient penalties, Hessian-vector products): it is written for first-order gradients (it
    reuses ``u = A (x * mask)`` saved without a graph), so its second-order terms would be
    wrong. Call first thing in the backward."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"lorakit's fused {node} computes first-order gradients only, and this backward "
            "records a graph (create_graph=True) for higher-order ones; run the forward inside "
            "`with lorakit.fast.plain_path():` (the plain formula, which autograd "
            "differentiates to any order)"
        )


class RankSide(NamedTuple):
    """One adapter as the fast path sees it: A (r, k), B (d, r), the rank-side factor
    ``c = s / (1 - p)`` and the drop probability in 1/65536 units (0: no dropout)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank_scale: float
    drop_levels: int


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` (itself when it already is; an adapter is r (d + k) numbers)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def linear_output(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool
) -> torch.Tensor:
    """The base layer's output ``x W0^T + b`` (..., d) for x (..., k), as a fresh tensor:
    ``nn.Linear``'s ``F.linear``, or for ``Conv1D`` (``fan_in_fan_out``: W0 stored (k, d))
    its ``addmm`` on the rows of x."""
    if not fan_in_fan_out:
        return F.linear(x, weight, bias)
    x_rows = x.reshape(-1, x.shape[-1])  # (N, k)
    out = x_rows @ weight if bias is None else torch.addmm(bias, x_rows, weight)  # (N, d)
    return out.view(*x.shape[:-1], out.shape[-1])


def node_output(out_rows: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """A fused node's output h (..., d) from its rows (N, d), sharing their storage (no copy).

    Not a view: autograd forbids changing in place a view returned by a custom Function (Gemma3n's
    ``per_layer_projection *= scale`` on its LoRA ``per_layer_model_projection``). ``detach()``
    makes the reshaped rows a plain tensor, which the node's output may be; the gradient reaching
    the node is the same."""
    return out_rows.view(*x_shape[:-1], out_rows.shape[-1]).detach()


def base_input_grad(
    grad_rows: torch.Tensor, weight: torch.Tensor, fan_in_fan_out: bool
) -> torch.Tensor:
    """``G W0`` (N, k): the base layer's input gradient, as a fresh tensor."""
    return grad_rows @ weight.T if fan_in_fan_out else grad_rows @ weight


def dropout_mask(x_rows: torch.Tensor, drop_levels: int, seed: int) -> torch.Tensor | None:
    """The boolean keep-mask for ``x_rows`` (None without dropout)."""
    return keep_mask(x_rows.shape, drop_levels, seed, x_rows.device) if drop_levels else None


class FusedLoraLinear(torch.autograd.Function):
    """The training node; see the module docstring for the formulas. Non-tensor arguments:
    ``rank_scale`` (c), ``drop_levels``, ``seed`` (of the dropout mask), ``fan_in_fan_out``."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        rank_scale: float,
        drop_levels: int,
        seed: int,
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        x_rows = x.reshape(-1, x.shape[-1])  # (N, k)
        out = linear_output(x_rows, weight, bias, fan_in_fan_out)  # (N, d)
        mask = input_mask(x_rows.shape, drop_levels, seed, x.device, x.dtype)
        kept = x_rows if mask is None else mask.kept(x_rows)
        low_rank = F.linear(kept, lora_A.to(x.dtype))  # (N, r)
        out.addmm_(low_rank, lora_B.to(x.dtype).T, alpha=rank_scale)
        keep_x = x if ctx.needs_input_grad[3] else None
        needs_mask = mask is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3])
        mask_bits = mask.saved() if needs_mask else None
        ctx.save_for_backward(keep_x, weight, lora_A, lora_B, low_rank, mask_bits)
        ctx.x_shape = x.shape
        ctx.settings = (rank_scale, fan_in_fan_out, drop_levels, seed)
        return node_output(out, x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        refuse_double_backward("LoRA linear node")
        x, weight, lora_A, lora_B, low_rank, mask_bits = ctx.saved_tensors
        fan_in_fan_out = ctx.settings[1]
        needs_x, _, needs_bias, needs_A, needs_B = ctx.needs_input_grad[:5]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d)
        mask, grad_low_rank, grad_A, grad_B = rank_side_backward(
            ctx, grad_rows, x, low_rank, lora_A, lora_B, mask_bits, (needs_x, needs_A, needs_B)
        )
        grad_x = grad_bias = None
        if needs_x:
            grad_low_rank = as_dtype(grad_low_rank, grad_rows.dtype)
            grad_x = input_grad(grad_rows, weight, fan_in_fan_out, grad_low_rank, lora_A, mask)
            grad_x = grad_x.view(ctx.x_shape)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None


def rank_side_backward(
    ctx,
    grad_rows: torch.Tensor,
    x: torch.Tensor | None,
    low_rank: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    mask_bits: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[InputMask | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The adapter's side of a fused node's backward (this node's and
    ``lorakit.fast.quantized``'s): the forward's dropout mask restored when dL/dx or dL/dA
    needs it, then ``adapter_grads``. ``ctx.settings`` starts with ``rank_scale`` and ends
    with ``(drop_levels, seed)``; ``needs``: (dL/dx, dL/dA, dL/dB). Returns
    ``(mask, g, dL/dA, dL/dB)``."""
    needs_x, needs_A, needs_B = needs
    rank_scale, *_, drop_levels, seed = ctx.settings
    mask = None
    if needs_x or needs_A:
        shape = (grad_rows.shape[0], ctx.x_shape[-1])
        mask = restored_mask(mask_bits, shape, drop_levels, seed, grad_rows.device, grad_rows.dtype)
    x_rows = None if x is None else x.reshape(-1, x.shape[-1])  # (N, k)
    grad_low_rank, grad_A, grad_B = adapter_grads(
        grad_rows, x_rows, mask, low_rank, lora_A, lora_B, rank_scale, needs_A, needs_B
    )
    return mask, grad_low_rank, grad_A, grad_B


def input_grad(
    grad_rows: torch.Tensor,
    weight: torch.Tensor,
    fan_in_fan_out: bool,
    grad_low_rank: torch.Tensor,
    lora_A: torch.Tensor,
    mask: InputMask | None,
) -> torch.Tensor:
    """``dL/dx = G W0 + mask * (g A)`` (N, k). Without dropout ``g A`` (K = r) is added into
    ``G W0``; with it the masked ``g A`` is computed first and the base GEMM adds ``G W0`` into it
    (beta = 1), so the mask costs no pass over a separate product."""
    lora_A = as_dtype(lora_A, grad_rows.dtype)
    if mask is None:
        return base_input_grad(grad_rows, weight, fan_in_fan_out).addmm_(grad_low_rank, lora_A)
    grad_x = mask.zero_dropped_(grad_low_rank @ lora_A)  # (N, k)
    return grad_x.addmm_(grad_rows, weight.T if fan_in_fan_out else weight)


CHUNK_ELEMENTS = 1 << 22  # rows of G and x cast to the adapter dtype at a time: at most 4M values


def adapter_grads(
    grad_rows: torch.Tensor,
    x_rows: torch.Tensor | None,
    mask: InputMask | None,
    low_rank: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    rank_scale: float,
    needs_A: bool,
    needs_B: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``g = c G B`` (N, r), ``dL/dA = g^T (x * mask)`` (r, k), ``dL/dB = c G^T u`` (d, r).

    When the adapter is wider than the activations (fp32 adapters on a bf16 model) these rank-r
    products are accumulated in the adapter's dtype from row chunks of G and x cast on the fly,
    with no fp32 copy of a whole activation: dL/dA gets fp32 accuracy; dL/dB only that of ``u``
    (``low_rank``, computed and saved in x's dtype: about 2e-3 relative for bf16).
    """
    accumulate_dtype = lora_A.dtype
    if torch.finfo(accumulate_dtype).bits <= torch.finfo(grad_rows.dtype).bits:
        grad_low_rank = (grad_rows @ as_dtype(lora_B, grad_rows.dtype)).mul_(rank_scale)  # (N, r)
        grad_A = grad_B = None
        if needs_A:
            x_kept = x_rows if mask is None else mask.kept(x_rows)  # temporary (N, k)
            grad_A = (grad_low_rank.T @ x_kept).to(accumulate_dtype)
        if needs_B:
            grad_B = (grad_rows.T @ low_rank).mul_(rank_scale).to(lora_B.dtype)
        return grad_low_rank, grad_A, grad_B
    rows, width = grad_rows.shape[0], max(grad_rows.shape[1], lora_A.shape[1])
    step = max(1, CHUNK_ELEMENTS // width)
    grad_low_rank = grad_rows.new_empty((rows, lora_A.shape[0]), dtype=accumulate_dtype)
    grad_A = torch.zeros_like(lora_A) if needs_A else None
    grad_B = torch.zeros_like(lora_B, dtype=accumulate_dtype) if needs_B else None
    for start in range(0, rows, step):
        part = slice(start, start + step)
        grad_part = grad_rows[part].to(accumulate_dtype)  # (n, d)
        torch.mm(grad_part, lora_B.to(accumulate_dtype), out=grad_low_rank[part]).mul_(rank_scale)
        if needs_B:
            grad_B.addmm_(grad_part.T, low_rank[part].to(accumulate_dtype), alpha=rank_scale)
        if needs_A:
            x_part = x_rows[part].to(  # (n, k), a contiguous copy, masked in place
                accumulate_dtype, copy=True, memory_format=torch.contiguous_format
            )
            if mask is not None:
                mask.zero_dropped_(x_part, start)
            grad_A.addmm_(grad_low_rank[part].T, x_part)
    return grad_low_rank, grad_A, grad_B.to(lora_B.dtype) if needs_B else None


def lora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[RankSide],
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """``W0 x + b + sum_a c_a B_a A_a (x * mask_a)`` without autograd: one fresh (..., d) output,
    each adapter added into it in place, rank-r product first."""
    x_rows = x.reshape(-1, x.shape[-1])  # (N, k)
    out = linear_output(x_rows, weight, bias, fan_in_fan_out)  # (N, d)
    for adapter in adapters:
        seed = new_seed() if adapter.drop_levels else 0
        mask = input_mask(x_rows.shape, adapter.drop_levels, seed, x.device, x.dtype)
        x_kept = x_rows if mask is None else mask.kept(x_rows)
        low_rank = F.linear(x_kept, as_dtype(adapter.lora_A, x.dtype))  # (N, r)
        out.addmm_(low_rank, as_dtype(adapter.lora_B, x.dtype).T, alpha=adapter.rank_scale)
    return out.view(*x.shape[:-1], out.shape[-1])
