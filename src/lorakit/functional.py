"""The LoRA maths, once. Every other module calls these functions.

For a frozen base weight ``W0`` (d x k) and an input ``x`` (..., k)::

    h = W0 x + s * B A x,   A: (r, k),  B: (d, r),  s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

- Dropout (probability p, training only) applies to the input of ``A`` only.
- Merge: ``W = W0 + s * B A``; for weights stored (in, out) such as transformers' ``Conv1D``
  the delta is transposed.
- Trainable parameters per adapted (d x k) matrix: ``r * (d + k)``.
- Embeddings follow PEFT's convention: ``A`` is (r, num_embeddings) and ``B`` (dim, r);
  ``h = E[ids] + s * A^T[ids] B^T`` and the delta of the (num_embeddings, dim) table is
  ``s * (B A)^T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "compression_ratio",
    "delta_weight",
    "embedding_delta_weight",
    "fold_scale",
    "lora_embedding_forward",
    "lora_forward",
    "lora_parameter_count",
    "rank_side_scale",
    "scaling",
]


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor ``s`` in ``h = W0 x + s B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA)."""
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got r={rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def rank_side_scale(scale: float, dropout: float = 0.0) -> float:
    """``s / (1 - p)``: the factor put on the rank-r product when inverted dropout is applied as a
    0/1 mask, so that ``s * B A (x * mask / (1 - p)) = (s / (1 - p)) * B (A (x * mask))``.

    ``p`` is the drop probability actually used (0 without dropout, giving ``s``).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got p={dropout}")
    return scale / (1.0 - dropout)


def fold_scale(lora_B: torch.Tensor, scale: float, target_scale: float) -> torch.Tensor:
    """``B' = B * (s / s_t)`` in float32, so that ``s_t B' A = s B A``: an adapter re-expressed
    for a reader that applies its own scale ``s_t`` (llama.cpp: ``alpha / r``). Shapes kept."""
    return lora_B.to(torch.float32) * (scale / target_scale)


def lora_parameter_count(out_features: int, in_features: int, rank: int) -> int:
    """Trainable parameters of one adapted (d x k) matrix: ``r * (d + k)``."""
    return rank * (out_features + in_features)


def compression_ratio(out_features: int, in_features: int, rank: int) -> float:
    """``d * k / (r * (d + k))``: how many times fewer parameters than the full matrix."""
    return out_features * in_features / lora_parameter_count(out_features, in_features, rank)


def delta_weight(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``s * B @ A`` computed in ``dtype`` (float32 by default, whatever the storage dtype).

    Shapes: ``lora_A`` (r, k), ``lora_B`` (d, r) -> (d, k); transposed to (k, d) when the
    base weight is stored (in, out) (``fan_in_fan_out``, e.g. GPT-2's ``Conv1D``).
    """
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scale  # (d, k)
    return delta.T if fan_in_fan_out else delta


def embedding_delta_weight(
    lora_embedding_A: torch.Tensor,
    lora_embedding_B: torch.Tensor,
    scale: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``s * (B @ A)^T`` for an embedding table: A (r, num_embeddings), B (dim, r) -> (num, dim)."""
    return delta_weight(lora_embedding_A, lora_embedding_B, scale, fan_in_fan_out=True, dtype=dtype)


def lora_forward(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The low-rank branch ``s * dropout(x) A^T B^T``, computed and returned in ``x``'s dtype.

    Shapes: ``x`` (..., k), ``lora_A`` (r, k), ``lora_B`` (d, r) -> (..., d). The adapter is cast
    to ``x``'s dtype (r (d + k) numbers) rather than ``x`` to the adapter's (a full copy of the
    activation, e.g. fp32 of a bf16 model), as autocast would. The rank-r product is computed
    first and the scale is applied on the rank-r side. This is the plain reference path; the
    training fast path (``lorakit.fast``) computes the same thing without the dropout copy.
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
    low_rank = F.linear(x, lora_A.to(x.dtype))  # (..., r)
    return F.linear(low_rank * scale, lora_B.to(x.dtype))  # (..., d)


def lora_embedding_forward(
    ids: torch.Tensor,
    lora_embedding_A: torch.Tensor,
    lora_embedding_B: torch.Tensor,
    scale: float,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """The low-rank branch of an embedding: ``s * A^T[ids] B^T``.

    Shapes: ``ids`` (...), A (r, num_embeddings), B (dim, r) -> (..., dim).
    """
    low_rank = F.embedding(ids, lora_embedding_A.T, padding_idx=padding_idx)  # (..., r)
    return (low_rank * scale) @ lora_embedding_B.T  # (..., dim)
