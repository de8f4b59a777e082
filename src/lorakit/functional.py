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
- A bare parameter (PEFT's ``target_parameters``, e.g. the fused 3-D expert weights of a
  mixture-of-experts layer, (E, d, k)): A is (E r, k) and B (d, E r); expert e's update is
  ``s * B_e A_e`` with ``A_e = A[e r:(e + 1) r]`` (consecutive rows) and ``B_e = B[:, e::E]``
  (every E-th column, PEFT's layout); ``parameter_delta_weight``.

DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's ``use_dora=True``) adds a magnitude ``m``
(d,), one number per output feature, initialised to the row norms of ``W0 + s B A``::

    n = ||W0 + s B A||_row        (d,), treated as a constant for the gradient
    f = m / n                     (d,), n first rounded to m's dtype where that is narrower
    h = W0 x + (f - 1) * (W0 x~) + f * s * B A x~,    x~ = dropout(x)

(the bias is not scaled). Merge: ``W = f * (W0 + s B A)`` row by row. How ``n`` is computed
without a (d, k) copy of W0 is in ``lorakit.dora_norms`` (its functions are re-exported here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.dora_norms import base_row_sq_norms, dora_row_norms, norm_dtype, weight_rows

__all__ = [
    "add_lora_forward_",
    "base_row_sq_norms",
    "compression_ratio",
    "delta_weight",
    "dora_divisor",
    "dora_factor",
    "dora_merge_delta",
    "dora_output",
    "dora_row_norms",
    "embedding_delta_weight",
    "fold_scale",
    "lora_bias_delta",
    "lora_embedding_forward",
    "lora_forward",
    "lora_parameter_count",
    "merge_dtype",
    "parameter_delta_weight",
    "rank_side_scale",
    "replace_rows",
    "scaling",
]


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor ``s`` in ``h = W0 x + s B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA)."""
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got r={rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def rank_side_scale(scale: float, dropout: float = 0.0) -> float:
    """``s / (1 - p)``: the factor put on the rank-r product when inverted dropout is applied as a
    0/1 mask, so that ``s * B A (x * mask / (1 - p)) = (s / (1 - p)) * B (A (x * mask))``;
    ``p`` is the drop probability actually used (0 without dropout, giving ``s``)."""
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


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes ``W0 + sum_a delta_a`` (and each delta) in, for a base weight
    of ``weight_dtype``: float32 (a 16-bit base's sum too, rounded once to its dtype at the
    end), or the weight's own where it is wider, float64 (as PEFT's merge, which adds in the
    weight's dtype), so a float64 merge is not rounded through float32."""
    return torch.promote_types(weight_dtype, torch.float32)


def delta_weight(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``s * B @ A`` computed in ``dtype`` (float32 by default, whatever the storage dtype; a
    merge passes ``merge_dtype`` of the base weight's, float64 on a float64 base).

    Shapes: ``lora_A`` (r, k), ``lora_B`` (d, r) -> (d, k); transposed to (k, d) when the
    base weight is stored (in, out) (``fan_in_fan_out``, e.g. GPT-2's ``Conv1D``).
    """
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scale  # (d, k)
    return delta.T if fan_in_fan_out else delta


def parameter_delta_weight(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    num_experts: int,
    transposed: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The update of a bare parameter (``target_parameters``), in ``dtype``, laid out like it.

    ``num_experts`` = 0 for a 2-D parameter (d, k): ``s * B A`` as ``delta_weight``. For a 3-D
    parameter of E experts, A (E r, k) and B (d, E r) give (E, d, k) with expert e's block
    ``s * B[:, e::E] @ A[e r:(e + 1) r]`` (PEFT's ``ParamWrapper`` layout); ``transposed``: the
    parameter stores each expert (k, d) (transformers' ``is_transposed`` experts, e.g.
    GPT-OSS), giving (E, k, d).
    """
    if num_experts == 0:
        return delta_weight(lora_A, lora_B, scale, dtype=dtype)
    experts_A = lora_A.to(dtype).reshape(num_experts, -1, lora_A.shape[-1])  # (E, r, k)
    experts_B = lora_B.to(dtype).reshape(lora_B.shape[0], -1, num_experts)  # (d, r, E)
    delta = torch.bmm(experts_B.permute(2, 0, 1), experts_A) * scale  # (E, d, k)
    return delta.transpose(1, 2) if transposed else delta


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
    lora_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The low-rank branch ``s * dropout(x) A^T B^T``, computed and returned in ``x``'s dtype
    (plus ``s * b`` when the adapter has a bias on B, ``lora_bias`` (d,): ``lora_bias_delta``).

    Shapes: ``x`` (..., k), ``lora_A`` (r, k), ``lora_B`` (d, r) -> (..., d). The adapter is cast
    to ``x``'s dtype (r (d + k) numbers) rather than ``x`` to the adapter's (a full copy of the
    activation, e.g. fp32 of a bf16 model), as autocast would. The rank-r product is computed
    first and the scale is applied on the rank-r side. This is the plain reference path; the
    training fast path (``lorakit.fast``) computes the same thing without the dropout copy.
    Gradients through it have x's precision: fp32 adapters on a bf16 activation get dL/dA and
    dL/dB to bf16 accuracy (2e-3 to 6e-3 against float64), as their products run in bf16.
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
    low_rank = F.linear(x, lora_A.to(x.dtype))  # (..., r)
    out = F.linear(low_rank * scale, lora_B.to(x.dtype))  # (..., d)
    return out if lora_bias is None else out + lora_bias_delta(lora_bias, scale).to(x.dtype)


def add_lora_forward_(
    out: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B_t: torch.Tensor, scale: float
) -> torch.Tensor:
    """``out += s * (x A^T) B^T`` in place, no dropout (inference: serving one adapter on every
    row); returns ``out``. The same sum as ``lora_forward`` added to ``out``, in three ops (rank
    side first, scale on the rank side, the add fused into the product).

    Shapes: ``out`` (N, d), ``x`` (N, k), ``lora_A`` (r, k), ``lora_B_t`` (r, d) = B^T, all of
    ``out``'s dtype.
    """
    low_rank = F.linear(x, lora_A).mul_(scale)  # (N, r)
    return out.addmm_(low_rank, lora_B_t)  # (N, d)


def replace_rows(weight: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``W`` with rows ``indices`` replaced by ``rows`` (a new tensor; gradients reach ``rows``):
    trainable tokens (PEFT's ``trainable_token_indices``), whose adapter holds the new VALUES of
    its rows. Shapes: ``weight`` (num, dim), ``indices`` (n,), ``rows`` (n, dim) -> (num, dim)."""
    return weight.index_copy(0, indices, rows.to(weight.dtype))


def lora_bias_delta(lora_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``s * b``: what an adapter with a bias on B (PEFT's ``lora_bias=True``) adds to every
    output, and what merging it adds to the base bias. Shapes: ``lora_bias`` (d,) -> (d,);
    computed in float32, or in the bias's own dtype when wider (float64), as PEFT computes it
    (the branch casts it to the activation's dtype).

    With it the branch is ``s (B A x + b)`` (PEFT applies ``lora_B``, bias included, before
    the scale), so merging gives ``W0 + s B A`` and ``bias0 + s b``."""
    return lora_bias.to(torch.promote_types(lora_bias.dtype, torch.float32)) * scale


def lora_embedding_forward(
    ids: torch.Tensor,
    lora_embedding_A: torch.Tensor,
    lora_embedding_B: torch.Tensor,
    scale: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """The low-rank branch of an embedding: ``s * A^T[ids] B^T``.

    Shapes: ``ids`` (...), A (r, num_embeddings), B (dim, r) -> (..., dim). The lookup in
    ``A^T`` takes the base embedding's options (``padding_idx``, ``max_norm``, ``norm_type``,
    ``scale_grad_by_freq``, ``sparse``; see ``F.embedding``), as PEFT's does: e.g. with
    ``scale_grad_by_freq`` the gradient of column ``i`` of A is divided by the count of ``i``
    in ``ids``.
    """
    low_rank = F.embedding(
        ids, lora_embedding_A.T, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
    )  # (..., r)
    return (low_rank * scale) @ lora_embedding_B.T  # (..., dim)


# ------------------------------------------------------------------------------------- DoRA
def dora_divisor(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The ``n`` (d,) that ``f = m / n`` divides by: ``norms`` detached and, where ``m`` is
    stored in a narrower dtype than ``n`` (a 16-bit adapter: ``n`` is float32), rounded to
    ``m``'s dtype and widened back (the division stays in ``n``'s dtype).

    Why: a new adapter stores ``m = n`` rounded to its dtype, so dividing by the unrounded
    ``n`` gives ``|f - 1|`` up to 2^-8 (bf16) and a new adapter moves the model; divided by
    ``n`` rounded the same way, ``f = 1`` exactly (PEFT gets the same by computing ``n`` in
    the 16-bit dtype). For a trained ``m`` the rounding moves ``f`` by at most one rounding
    of ``m``'s dtype, the precision ``m`` is held to anyway. The fast path's ``dL/dm``
    divides by this ``n`` too."""
    norms = norms.detach()
    if magnitude.dtype != norms.dtype and (
        torch.promote_types(magnitude.dtype, norms.dtype) == norms.dtype
    ):
        return norms.to(magnitude.dtype).to(norms.dtype)
    return norms


def dora_factor(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``f = m / n`` (d,): the per-output scale of DoRA, in the wider of the two dtypes (float32
    for a 16-bit ``m``), ``n`` as ``dora_divisor`` gives it (detached: a constant for the
    gradient, DoRA paper section 4.3); ``m`` keeps its gradient. Every path computes ``f``
    here: the plain and fast forwards, the merge and the serving bank."""
    return magnitude / dora_divisor(magnitude, norms)


def dora_output(
    base_part: torch.Tensor, lora_part: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """What a DoRA adapter adds to the base output: ``(f - 1) * (W0 x~) + f * (s B A x~)``.

    Shapes: ``base_part`` = ``W0 x~`` without bias (..., d), ``lora_part`` = ``s B A x~``
    (..., d), ``factor`` = ``f`` (d,); computed in ``base_part``'s dtype (``f - 1`` is formed in
    ``f``'s wider dtype first, so a bf16 model keeps its small deviations from 1).
    """
    dtype = base_part.dtype
    return (factor - 1.0).to(dtype) * base_part + factor.to(dtype) * lora_part.to(dtype)


def dora_merge_delta(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    norms: torch.Tensor,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """What a DoRA adapter adds to ``W0`` when merged: ``f * (W0 + s B A) - W0`` per output row
    (so ``W0 + delta = f * (W0 + s B A)``, the merged weight), in float32 (float64 if an input
    is), laid out like ``weight``: (d, k), or (k, d) with ``fan_in_fan_out``.

    Several adapters merge as the forward adds them: ``W = W0 + sum_a delta_a``.
    """
    dtype = norm_dtype(weight, lora_A, lora_B)
    factor = dora_factor(magnitude.detach(), norms.to(dtype)).to(dtype)  # (d,); m's own dtype
    rows = weight_rows(weight.detach(), fan_in_fan_out).to(dtype)  # (d, k)
    lora = delta_weight(lora_A.detach(), lora_B.detach(), scale, dtype=dtype)  # (d, k)
    delta = factor[:, None] * (rows + lora) - rows
    return delta.T if fan_in_fan_out else delta
