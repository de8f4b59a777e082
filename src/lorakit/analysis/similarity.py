"""Subspace similarity between two adapters (Hu et al. 2021, LoRA paper §7).

With ``U_1`` (k, r1) and ``U_2`` (k, r2) orthonormal bases (e.g. the right singular vectors of
two adapters' A matrices, ``torch.linalg.svd(A, full_matrices=False).Vh.T``, or of their
updates ΔW, the ``V`` of ``spectrum.low_rank_svd(A, B, s)``), ordered by singular value::

    φ(U_1, U_2, i, j) = ||U_1[:, :i]^T U_2[:, :j]||_F^2 / min(i, j)   in [0, 1]

1 when the smaller of the two top subspaces lies inside the other, 0 when they are orthogonal.
(The squared cosines of the principal angles between the subspaces, averaged over min(i, j).)
"""

from __future__ import annotations

import torch

__all__ = ["similarity_grid", "subspace_similarity"]


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor, i: int, j: int) -> float:
    """``φ = ||u1[:, :i]^T u2[:, :j]||_F^2 / min(i, j)`` for orthonormal columns u1 (k, r1), u2 (k, r2)."""
    if not (1 <= i <= u1.shape[1] and 1 <= j <= u2.shape[1]):
        raise ValueError(
            f"i={i}, j={j} must be in 1..{u1.shape[1]} and 1..{u2.shape[1]} (the bases' ranks)"
        )
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"the bases live in different spaces: {u1.shape[0]} vs {u2.shape[0]} rows")
    overlap = u1[:, :i].to(torch.float64).T @ u2[:, :j].to(torch.float64)  # (i, j)
    return float((overlap**2).sum()) / min(i, j)


def similarity_grid(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """All ``φ(i, j)`` for i in 1..r1, j in 1..r2, as an (r1, r2) float64 tensor.

    Computed from one (r1, r2) product with 2-D cumulative sums: ``φ(i, j) = C[i, j] / min(i, j)``
    with ``C[i, j] = sum_{a<=i, b<=j} (u1_a · u2_b)^2``.
    """
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"the bases live in different spaces: {u1.shape[0]} vs {u2.shape[0]} rows")
    squared = (u1.to(torch.float64).T @ u2.to(torch.float64)) ** 2  # (r1, r2)
    cumulative = squared.cumsum(0).cumsum(1)
    i = torch.arange(1, squared.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, squared.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)
