"""Initialisations that take the adapter from the base weight: PiSSA, OLoRA and LoftQ (PEFT's
``init_lora_weights="pissa"``, ``"pissa_niter_K"``, ``"olora"`` and ``"loftq"``; LoftQ in
``loftq_factors``), the settings of the data-driven EVA (``lorakit.eva``), PEFT's drawn
``"orthogonal"`` factors (``orthogonal_factors``: B A = 0, the base unchanged), the dtype every
init draws in (``DRAW_DTYPE``), and the messages for PEFT's values lorakit does not implement
(MiCA, CorDA, LoRA-GA: ``not_implemented_message``).

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

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "BASE_CHANGING_INITS",
    "DRAW_DTYPE",
    "EvaConfig",
    "LoftQConfig",
    "canonical_init",
    "changes_base",
    "changes_base_in_peft_only",
    "factors_for",
    "loftq_factors",
    "not_implemented_message",
    "olora_factors",
    "orthogonal_factors",
    "pissa_factors",
    "randomised_pissa",
]

BASE_CHANGING_INITS = ("pissa", "pissa_niter_K", "olora", "loftq")
# PEFT's inits that also rewrite the base (W_res = W0 - s B0 A0) but from data lorakit does not
# have, so it cannot redo them: CorDA (activation covariances; PEFT takes any "corda..." value)
# and LoRA-GA (gradients; "lora_ga" exactly). Their unconverted files are refused on loading.
PEFT_ONLY_BASE_CHANGING_INITS = ("corda", "lora_ga")
# The init_lora_weights strings PEFT compares case-insensitively (``init.lower() == ...`` in
# its LoRA layer); every other one ("pissa...", "loftq", "eva", "orthogonal", ...) exactly.
CASE_INSENSITIVE_INITS = ("gaussian", "mica", "olora")
_PISSA = re.compile(r"pissa(?:_niter_(\d+))?")
DRAW_DTYPE = torch.float32
"""The dtype new factors are drawn in, whatever dtype they are stored in (cast afterwards):
PEFT's ``nn.Linear`` / ``torch.randn`` draw in the default dtype, float32, and cast to the base
dtype, so a seed gives PEFT's values on a float64 base too (a float64 draw gives others)."""

_CONVERT_FIRST = (
    "initialise, train and save it with peft, converting it on saving "
    "(save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved right "
    "after the init>)), then load the converted file, a plain LoRA for the original base, "
    "with lorakit"
)
# PEFT's init_lora_weights values lorakit does not implement: (what it is, the way out).
_PEFT_ONLY = {
    "mica": (
        "MiCA (B from the r left singular vectors of W0 with the smallest singular values, "
        "A = 0, B frozen while training)",
        "initialise it with peft and load the saved file with lorakit (it reads as a plain "
        "LoRA: the same forward; keep lora_B frozen to train it as MiCA does), or use "
        "init_lora_weights=True",
    ),
    "corda": (
        "CorDA (A and B from the SVD of W0 times activation statistics of data; the base "
        "becomes W0 - s B A)",
        _CONVERT_FIRST,
    ),
    "lora_ga": (
        "LoRA-GA (A and B from the SVD of gradients on data; the base becomes W0 - s B A)",
        _CONVERT_FIRST,
    ),
}


@dataclass
class EvaConfig:
    """Settings of EVA, ``init_lora_weights="eva"`` (PEFT's ``EvaConfig``, same fields and
    defaults; the procedure is ``lorakit.eva.initialize_lora_eva_weights``)."""

    rho: float = 2.0
    """A layer's rank may grow to ``round(r * rho)`` (>= 1; 1 keeps every rank)."""
    tau: float = 0.99
    """Stop reading batches once every needed component's cosine similarity with its value one
    batch earlier is >= tau (in [0, 1])."""
    use_label_mask: bool = True
    """Leave out token positions whose ``labels`` equal ``label_mask_value``."""
    label_mask_value: int = -100
    """The label of positions left out."""
    whiten: bool = False
    """Divide each component by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """``alpha *= new_rank / r`` for a layer whose rank changed (same gradient scale)."""

    def __post_init__(self) -> None:
        _check_setting(self, "rho", _is_number(self.rho) and self.rho >= 1, "a number >= 1")
        _check_setting(
            self, "tau", _is_number(self.tau) and 0.0 <= self.tau <= 1.0, "a number in [0, 1]"
        )
        for flag in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            _check_setting(self, flag, isinstance(getattr(self, flag), bool), "True or False")
        _check_setting(
            self, "label_mask_value", _is_int(self.label_mask_value), "an integer (a label id)"
        )


@dataclass
class LoftQConfig:
    """Settings of LoftQ, ``init_lora_weights="loftq"`` (PEFT's ``LoftQConfig``)."""

    loftq_bits: int = 4
    """4 (NF4) or 8 (int8 row-wise), bitsandbytes' formats."""
    loftq_iter: int = 1
    """Alternating quantize / SVD steps (>= 1)."""

    def __post_init__(self) -> None:
        _check_setting(
            self, "loftq_bits", _is_int(self.loftq_bits) and self.loftq_bits in (4, 8), "4 or 8"
        )
        _check_setting(
            self,
            "loftq_iter",
            _is_int(self.loftq_iter) and self.loftq_iter >= 1,
            "an integer >= 1",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float, not a bool, and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_setting(settings: object, field_name: str, ok: bool, expected: str) -> None:
    """``ValueError`` naming the field of ``settings`` (an ``EvaConfig`` / ``LoftQConfig``),
    its value and what it should be, unless ``ok``."""
    if not ok:
        value = getattr(settings, field_name)
        raise ValueError(
            f"{type(settings).__name__}.{field_name}={value!r} is invalid: expected {expected}"
            f" (of type {type(value).__name__})."
        )


def canonical_init(init: object) -> object:
    """``init`` (an ``init_lora_weights`` value) in lower case when PEFT reads it so
    (``CASE_INSENSITIVE_INITS``: "OLoRA" is "olora", "Gaussian" is "gaussian"); any other
    value as it is ("PiSSA" stays, and is refused, as PEFT refuses it)."""
    if isinstance(init, str) and init.lower() in CASE_INSENSITIVE_INITS:
        return init.lower()
    return init


def not_implemented_message(init: object) -> str | None:
    """The ``ValueError`` message for a PEFT ``init_lora_weights`` value lorakit does not
    implement ("mica" in any case, "corda..." as PEFT matches its prefix, "lora_ga"), saying
    what it is and what to do instead; None for any other value
    (a typo gets the config's "is invalid: expected ..." message). "MiCA" is quoted as PEFT
    reads it, "mica" (``canonical_init``)."""
    if not isinstance(init, str):
        return None
    key = "corda" if init.startswith("corda") else init
    if key not in _PEFT_ONLY:
        return None
    what, way_out = _PEFT_ONLY[key]
    return (
        f"LoraConfig.init_lora_weights={init!r} is invalid: it is PEFT's {what}, "
        f"not implemented in lorakit: {way_out}."
    )


def changes_base(init: object) -> bool:
    """True when ``init`` (``LoraConfig.init_lora_weights``) rewrites the base weight."""
    return isinstance(init, str) and (
        init in ("olora", "loftq") or _PISSA.fullmatch(init) is not None
    )


def changes_base_in_peft_only(init: object) -> bool:
    """True when ``init`` (a file's ``init_lora_weights``) is one of
    ``PEFT_ONLY_BASE_CHANGING_INITS``, matched as PEFT matches it: ``"corda..."`` by its prefix,
    ``"lora_ga"`` exactly. Such a file's A and B fit ``W_res``, not the original base."""
    return isinstance(init, str) and (init.startswith("corda") or init == "lora_ga")


Residual = Callable[[torch.Tensor], torch.Tensor]
"""``W_res = residual(W0)``: a base-changing init's new base from the float32 ``W0`` (d, k)."""


def randomised_pissa(init: object) -> bool:
    """``init`` is ``"pissa_niter_K"``: PiSSA by a randomised SVD (``torch.svd_lowrank``)."""
    return isinstance(init, str) and init != "pissa" and _PISSA.fullmatch(init) is not None


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
    from lorakit.quantized.bnb import round_trip

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
        niter = _PISSA.fullmatch(init).group(1)
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
