"""The factors of the initialisations that take the adapter from the base weight: PiSSA, OLoRA
and LoftQ (PEFT's ``init_lora_weights="pissa"``, ``"pissa_niter_K"``, ``"olora"`` and
``"loftq"``; LoftQ in ``loftq_factors``), and PEFT's drawn ``"orthogonal"`` factors
(``orthogonal_factors``: B A = 0, the base unchanged). What the values mean and their settings:
``lorakit.init_methods``.

Both put the weight's principal part into the adapter and leave the rest as the new base, so the
layer computes what it did before (within float rounding)::

    W0 = W_res + s B A        (W0: d x k, A: r x k, B: d x r, s the adapter's scaling)

- PiSSA: ``W0 = U S V^T`` (SVD, singular values descending); with ``S_r`` the first r values,
  ``A = diag(sqrt(S_r / s)) V_r^T`` and ``B = U_r diag(sqrt(S_r / s))``. ``"pissa_niter_K"``
  takes ``U_r, S_r, V_r`` from ``torch.svd_lowrank(W0, r, niter=K)`` (randomised: faster on large
  matrices, depends on torch's random state).
- OLoRA: ``W0 = Q R`` (QR decomposition); ``A = R[:r]`` (r x k), ``B = Q[:, :r]`` (d x r).

Everything is computed in float32; ``A`` and ``B`` stay float32 and equal peft's factors on a
float32 base. On a bfloat16 / float16 base peft rounds ``A`` and ``B`` to the base dtype (then
stores them in float32); lorakit keeps the float32 factors, so ``W_res`` is the same and
``W_res + s B A`` is closer to ``W0`` (tiny bfloat16 Llama: max error 1.9e-4 against peft's
2.2e-4). Factors stored coarser than the base (``adapter_dtype=torch.bfloat16`` on a float32
base, which PEFT has no option for) are rounded first and ``W_res`` is computed from the rounded
ones (``factors_for``). ``W_res`` is rounded to the base weight's dtype and written into the base weight
Parameter in place (``lorakit.base_rewrite``: every layer's factorisation first, the writes
last, so a failure leaves no layer half done), so the base model is changed (``lorakit.unload``
gives back the modules holding ``W_res``, as PEFT's ``unload`` does). A saved adapter then only fits
``W_res``: its fingerprint says so (``lorakit.io``), and ``save_adapter(...,
initial_adapter=...)`` converts it into a plain LoRA for the original weights (``convert``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.init_methods import PISSA_VALUE, LoftQConfig

__all__ = [
    "DRAW_DTYPE",
    "Residual",
    "factors_for",
    "loftq_factors",
    "loftq_keeps",
    "olora_factors",
    "orthogonal_factors",
    "pissa_factors",
]

DRAW_DTYPE = torch.float32
"""The dtype new factors are drawn in, whatever dtype they are stored in (cast afterwards):
PEFT's ``nn.Linear`` / ``torch.randn`` draw in the default dtype, float32, and cast to the base
dtype, so a seed gives PEFT's values on a float64 base too (a float64 draw gives others)."""

Residual = Callable[[torch.Tensor], torch.Tensor]
"""``W_res = residual(W0)``: a base-changing init's new base from the float32 ``W0`` (d, k)."""


def loftq_factors(
    weight: torch.Tensor, rank: int, bits: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, Q)`` for LoftQ (PEFT's ``loftq_init``), all float32, ``weight`` (d, k).

    ``R = W0``; ``iterations`` times: ``Q = deq(quant(R))``, ``W0 - Q = U S V^T``,
    ``B = U_r sqrt(S_r)`` (d, r), ``A = sqrt(S_r) V_r^T`` (r, k), and (but after the last step)
    ``R = W0 - B A``. The new base is ``Q`` (already on the quantization grid: quantizing it
    again gives Q back), and ``W0 ~ Q + B A``: as in PEFT the scaling is not applied to the
    factors, so the layer starts at ``W0`` only when ``s = 1`` (``lora_alpha = r``).
    """
    weight = weight.to(torch.float32)
    lora_A, lora_B, residual = _loftq(weight, rank, bits, iterations)
    return lora_A, lora_B, residual(weight)


def loftq_keeps(weight: torch.Tensor, bits: int) -> bool:
    """True when LoftQ (any ``loftq_iter``) leaves ``weight`` (d, k) as it is: it is already on
    the quantization grid, ``deq(quant(W)) == W`` in float32 (the ``Q`` a LoftQ init left, as
    saved; ``lorakit.quantized.round_trip``). Then its first step finds ``W - Q = 0``, so
    ``B = A = 0`` at every step (square roots of zero singular values), every target is ``W``
    and the new base is ``deq(quant(W)) = W``: what peft's rerun on load gives too."""
    from lorakit.quantized.round_trip import round_trip

    weight = weight.to(torch.float32)
    return bool(torch.equal(round_trip(weight, bits), weight))


def orthogonal_factors(
    rank: int, in_features: int, out_features: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of PEFT's ``init_lora_weights="orthogonal"`` (``LoraLayer.orthogonal_init``),
    float32, drawn from torch's generator on ``device`` in PEFT's order, so that a seed gives
    PEFT's factors (after the layer's construction draws, ``LoraLinear.init_factors``)::

        X ~ N(0, 1) (r, r);  Q, _ = qr(X);  Q_odd = Q[0::2], Q_even = Q[1::2]  (r/2, r)
        A = (N(0, 1) (k, r/2) @ Q_odd)^T / 10    (r, k)
        B = N(0, 1) (r/2, d)^T @ Q_even / 10      (d, r)

    ``B A = G_B^T Q_even Q_odd^T G_A^T / 100 = 0`` (the rows of the orthogonal Q are
    orthonormal), so the layer starts at the base's output while A and B are not zero.
    ``rank`` must be even (``ValueError`` otherwise, as PEFT's)."""
    if rank % 2:
        raise ValueError(
            f"init_lora_weights='orthogonal' needs an even rank (A and B take alternate rows of "
            f"an r x r orthogonal matrix, so that B A = 0), got rank {rank}: use an even r "
            "and even rank_pattern values."
        )
    draw = {"dtype": DRAW_DTYPE, "device": device}
    q, _ = torch.linalg.qr(torch.randn(rank, rank, **draw))
    q_odd, q_even = q[0::2, :], q[1::2, :]
    lora_A = torch.randn(in_features, rank // 2, **draw).mm(q_odd).T / 10.0
    lora_B = torch.randn(rank // 2, out_features, **draw).T.mm(q_even) / 10.0
    return lora_A.contiguous(), lora_B.contiguous()


def pissa_factors(
    weight: torch.Tensor, rank: int, scale: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, W_res)`` for PiSSA (module docstring), all float32.

    ``weight`` (d, k); ``A`` (r, k), ``B`` (d, r), ``W_res = W0 - s B A`` (d, k).
    ``niter``: None for the exact SVD, K for ``torch.svd_lowrank`` with K iterations.
    """
    weight = weight.to(torch.float32)
    lora_A, lora_B, residual = _pissa(weight, rank, scale, niter)
    return lora_A, lora_B, residual(weight)


def olora_factors(
    weight: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, W_res)`` for OLoRA, all float32: ``W0 = Q R``, ``A = R[:r]`` (r, k),
    ``B = Q[:, :r]`` (d, r), ``W_res = W0 - s B A`` (d, k)."""
    weight = weight.to(torch.float32)
    lora_A, lora_B, residual = _olora(weight, rank, scale)
    return lora_A, lora_B, residual(weight)


def _loftq(
    weight: torch.Tensor, rank: int, bits: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, Residual]:
    """``loftq_factors`` with ``Q`` as a ``Residual``: it quantizes ``W0 - B' A'`` again from
    the step before last's factors (or ``W0``), the same float32 operations on the same
    tensors, so the same bits, without holding a full-size ``Q`` per layer."""
    from lorakit.quantized.round_trip import round_trip

    previous = None  # (B, A) of the step before, which the last target subtracts
    target = weight
    for step in range(iterations):
        quantized = round_trip(target, bits)
        left, values, right_t = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = values[:rank].sqrt()
        lora_B, lora_A = left[:, :rank] * root, root[:, None] * right_t[:rank]
        if step + 1 < iterations:
            target = weight - lora_B @ lora_A
            previous = (lora_B, lora_A)

    def residual(full: torch.Tensor) -> torch.Tensor:
        return round_trip(full if previous is None else full - previous[0] @ previous[1], bits)

    return lora_A, lora_B, residual


def _pissa(
    weight: torch.Tensor, rank: int, scale: float, niter: int | None
) -> tuple[torch.Tensor, torch.Tensor, Residual]:
    if niter is None:
        left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, values, right_t = left[:, :rank], values[:rank], right_t[:rank]
    else:
        left, values, right = torch.svd_lowrank(weight, rank, niter=niter)
        right_t = right.t()
    root = torch.sqrt(values / scale)  # (r,)
    lora_A = root[:, None] * right_t  # (r, k)
    lora_B = left * root[None, :]  # (d, r)
    return lora_A, lora_B, _minus_scaled_product(scale, lora_A, lora_B)


def _olora(
    weight: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, Residual]:
    q, r = torch.linalg.qr(weight)
    lora_A, lora_B = r[:rank].contiguous(), q[:, :rank].contiguous()
    return lora_A, lora_B, _minus_scaled_product(scale, lora_A, lora_B)


def _minus_scaled_product(scale: float, lora_A: torch.Tensor, lora_B: torch.Tensor) -> Residual:
    """``W0 -> W0 - s B A``."""
    return lambda full: full - scale * lora_B @ lora_A


def factors_for(
    init: str,
    weight: torch.Tensor,
    rank: int,
    scale: float,
    loftq: LoftQConfig | None = None,
    factor_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Residual]:
    """``(A, B, residual)`` of a base-changing ``init`` for the float32 ``weight`` (d, k).

    ``factor_dtype``: the dtype the adapter stores ``A`` and ``B`` in, when it is coarser than
    the base's (``inject(..., adapter_dtype=torch.bfloat16)`` on a float32 base). ``A`` and
    ``B`` are then returned rounded to it (as float32) and PiSSA / OLoRA's ``W_res = W0 - s B A``
    is computed from the rounded factors, so that the layer's ``W_res + s B A`` is ``W0``
    within float32 rounding rather than off by the factors' rounding (a tiny Llama's q_proj:
    1.1e-4 with bfloat16 factors). LoftQ's ``Q`` does not depend on the factors."""
    if init == "loftq":
        loftq = loftq or LoftQConfig()
        lora_A, lora_B, residual = _loftq(weight, rank, loftq.loftq_bits, loftq.loftq_iter)
    elif init == "olora":
        lora_A, lora_B, residual = _olora(weight, rank, scale)
    else:
        niter = PISSA_VALUE.fullmatch(init).group(1)
        niter = None if niter is None else int(niter)
        lora_A, lora_B, residual = _pissa(weight, rank, scale, niter)
    if factor_dtype is None:
        return lora_A, lora_B, residual
    lora_A, lora_B = _rounded(lora_A, factor_dtype), _rounded(lora_B, factor_dtype)
    if init != "loftq":
        residual = _minus_scaled_product(scale, lora_A, lora_B)
    return lora_A, lora_B, residual


def _rounded(factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``factor`` (float32) rounded to ``dtype`` and back to float32."""
    return factor.to(dtype).to(torch.float32)
