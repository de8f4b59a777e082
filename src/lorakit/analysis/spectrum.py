"""How low is the rank of a weight update? Singular values and effective ranks of ΔW.

For one (d x k) update ΔW with singular values σ_1 >= ... >= σ_n (n = min(d, k)):

- energy share of the first r directions: ``sum_{i<=r} σ_i^2 / sum_i σ_i^2`` (squared Frobenius
  norm captured by the best rank-r approximation, Eckart–Young);
- ``energy_rank(p)``: the smallest r whose energy share is >= p (90% and 99% in reports);
- entropy effective rank (Roy & Vetterli 2007): ``exp(-sum_i p_i log p_i)``, ``p_i = σ_i / sum σ``;
- stable rank: ``||ΔW||_F^2 / ||ΔW||_2^2 = sum σ_i^2 / σ_1^2``.

An adapter's update ``ΔW = s B A`` (A: r x k, B: d x r) is never formed: with ``B = Q_B R_B`` and
``A^T = Q_A R_A`` (thin QR), ``ΔW = Q_B (s R_B R_A^T) Q_A^T``, so the SVD of the small core
(r x r, or min(d, r) x min(k, r) when r exceeds d or k) gives the min(r, d, k) singular values, and
the singular vectors are ``Q_B U_core`` and ``Q_A V_core``.
All of it is computed in float64 (or float32 on request), whatever the storage dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import functional
from lorakit.analysis.factors import adapter_factors, tensor_factors

__all__ = [
    "Spectrum",
    "adapter_factors",
    "adapter_spectra",
    "energy_rank",
    "entropy_rank",
    "low_rank_svd",
    "refuse_non_finite",
    "singular_values",
    "spectrum_of_factors",
    "spectrum_of_matrix",
    "stable_rank",
    "tensor_factors",
    "tensor_spectra",
]


def singular_values(matrix: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values (descending) of a (d, k) matrix, computed in ``dtype``."""
    return torch.linalg.svdvals(matrix.detach().to(dtype))


def low_rank_svd(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``ΔW = s B A`` without forming the (d, k) product.

    Shapes: ``lora_A`` (r, k), ``lora_B`` (d, r). With ``m = min(r, d, k)`` (the most ΔW's rank
    can be) returns ``U`` (d, m), ``S`` (m,) descending, ``V`` (k, m) with
    ``ΔW = U diag(S) V^T``. Cost O((d + k) r^2) instead of O(d k min(d, k)).
    """
    q_b, r_b = torch.linalg.qr(lora_B.detach().to(dtype))  # (d, min(d, r)), (min(d, r), r)
    q_a, r_a = torch.linalg.qr(lora_A.detach().to(dtype).T)  # (k, min(k, r)), (min(k, r), r)
    # The core s R_B R_A^T is the same maths as s B A, applied to the triangular factors.
    core = functional.delta_weight(r_a.T, r_b, scale, dtype=dtype)  # (min(d, r), min(k, r))
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_core, s, q_a @ vh_core.T


def energy_rank(values: torch.Tensor, share: float) -> int:
    """Smallest r with ``sum_{i<=r} σ_i^2 >= share * sum σ_i^2`` (0 for a zero matrix)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"energy share must be in (0, 1], got {share}")
    energy = values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # A relative tolerance so that share=1.0 is reached despite rounding in the cumulative sum.
    target = torch.tensor(share - 1e-12, dtype=torch.float64)
    return min(int(torch.searchsorted(cumulative, target)) + 1, len(values))


def entropy_rank(values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p_i = σ_i / sum σ`` (0 for a zero matrix)."""
    values = values.to(torch.float64)
    total = float(values.sum())
    if total == 0.0:
        return 0.0
    p = values[values > 0] / total
    return math.exp(float(-(p * torch.log(p)).sum()))


def stable_rank(values: torch.Tensor) -> float:
    """``||ΔW||_F^2 / ||ΔW||_2^2 = sum σ_i^2 / σ_1^2`` (0 for a zero matrix)."""
    values = values.to(torch.float64)
    if values.numel() == 0 or float(values.max()) == 0.0:
        return 0.0
    return float((values**2).sum() / values.max() ** 2)


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class Spectrum:
    """The singular values of one layer's update and the ranks derived from them.

    ``shape`` is (d, k) of ΔW; ``singular_values`` is float64, descending; ``max_rank`` is the
    bound on ΔW's rank (min(r, d, k) for an adapter of rank r, min(d, k) for a full update), so
    never more than the number of singular values.
    """

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    max_rank: int

    @property
    def module_type(self) -> str:
        """The module's role, the same in every block: the name after the block index
        (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``, BERT's
        ``...layer.0.output.dense`` -> ``output.dense``), or the name itself outside blocks."""
        found = _LAYER_INDEX.search(f".{self.name}")  # (a name may start with the index)
        return self.name[found.end() - 1 :] if found else self.name

    @property
    def layer_index(self) -> int | None:
        """The first ``.<digits>.`` in the module name (the transformer block), if any."""
        found = _LAYER_INDEX.search(f".{self.name}.")
        return int(found.group(1)) if found else None

    def energy_rank(self, share: float) -> int:
        return energy_rank(self.singular_values, share)

    def energy_share(self, rank: int) -> float:
        """Share of ``||ΔW||_F^2`` kept by the best rank-``rank`` approximation."""
        energy = self.singular_values**2
        total = float(energy.sum())
        return 1.0 if total == 0.0 else float(energy[:rank].sum()) / total

    def to_dict(self, max_values: int | None = None) -> dict:
        """JSON-ready summary; ``max_values`` caps how many singular values are listed (the
        first, largest ones); ``singular_value_count`` says how many there are and
        ``singular_values_truncated`` whether the list stops short of them."""
        values = self.singular_values[:max_values] if max_values else self.singular_values
        return {
            "name": self.name,
            "module_type": self.module_type,
            "layer": self.layer_index,
            "shape": list(self.shape),
            "max_rank": self.max_rank,
            "frobenius_norm": float(torch.linalg.vector_norm(self.singular_values)),
            "spectral_norm": float(self.singular_values[0]) if len(self.singular_values) else 0.0,
            "rank_90": self.energy_rank(0.9),
            "rank_99": self.energy_rank(0.99),
            "entropy_rank": entropy_rank(self.singular_values),
            "stable_rank": stable_rank(self.singular_values),
            "singular_values": [float(v) for v in values],
            "singular_value_count": len(self.singular_values),
            "singular_values_truncated": len(values) < len(self.singular_values),
        }


def spectrum_of_matrix(
    name: str, delta: torch.Tensor, dtype: torch.dtype = torch.float64
) -> Spectrum:
    """Spectrum of a dense (d, k) update, e.g. ``W_ft - W0``."""
    d, k = delta.shape
    return Spectrum(name, (d, k), singular_values(delta, dtype), min(d, k))


def spectrum_of_factors(
    name: str,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dtype: torch.dtype = torch.float64,
) -> Spectrum:
    """Spectrum of ``s B A`` from the factors (A: r x k, B: d x r), never forming (d, k).

    ``max_rank`` is min(r, d, k): a rank above d or k (PEFT's ``rank_pattern`` allows one) adds
    no direction that ΔW can hold."""
    _, values, _ = low_rank_svd(lora_A, lora_B, scale, dtype)
    (rank, k), d = lora_A.shape, lora_B.shape[0]
    return Spectrum(name, (d, k), values, min(rank, d, k))


def adapter_spectra(
    model: nn.Module, adapter_name: str = "default", dtype: torch.dtype = torch.float64
) -> list[Spectrum]:
    """Spectra of every layer's ``s B A`` for one adapter injected in ``model``."""
    return [
        spectrum_of_factors(name, lora_A, lora_B, scale, dtype)
        for name, lora_A, lora_B, scale in adapter_factors(model, adapter_name)
    ]


def refuse_non_finite(name: str, base: torch.Tensor, finetuned: torch.Tensor) -> None:
    """``ValueError`` naming layer ``name`` and the model(s) whose weight holds NaN or inf (its
    ΔW has no SVD)."""
    broken = [
        f"{count} in the {which} model"
        for which, weight in (("base", base), ("fine-tuned", finetuned))
        if (count := int((~torch.isfinite(weight.detach())).sum()))
    ]
    if broken:
        raise ValueError(
            f"layer {name!r}: its weight holds NaN or inf values ({', '.join(broken)}), so "
            "W_ft - W0 has no spectrum; check that model's checkpoint (did the training diverge?)"
        )


def tensor_spectra(
    tensors: Mapping[str, torch.Tensor], config, dtype: torch.dtype = torch.float64
) -> list[Spectrum]:
    """Spectra of an adapter read from disk (``lorakit.io.read_adapter``'s tensors + config)."""
    return [
        spectrum_of_factors(name, lora_A, lora_B, scale, dtype)
        for name, lora_A, lora_B, scale in tensor_factors(tensors, config)
    ]
