"""How several weight updates ΔW₁ … ΔWₙ (one module, same shape) become one, with weights w.

Each function takes the updates as they act on the model (``ΔWᵢ = sᵢ Bᵢ Aᵢ``, the scaling
included; shape (d, k)), never the LoRA factors A and B separately, and returns the combined
ΔW (d, k) in the updates' dtype. The meanings are those of PEFT's ``peft.utils.merge_utils``
(checked against it in tests/test_combine_methods.py):

- ``weighted_sum``: ``Σ wᵢ ΔWᵢ`` (task arithmetic).
- ``magnitude_prune``: keep the ``int(density · numel)`` largest-magnitude entries of each ΔWᵢ
  (the rest set to 0), then ``Σ wᵢ ΔWᵢ``.
- ``ties``: prune by magnitude as above; elect a sign per entry from the pruned, UNWEIGHTED
  updates (``"total"``: the sign of ``Σ ΔWᵢ``; ``"frequency"``: the sign of ``Σ sign(ΔWᵢ)``;
  a tie elects +); the result is the mean of the weighted entries ``wᵢ ΔWᵢ`` whose sign agrees
  with the elected one (entries where none agrees are 0).
- ``dare_linear``: drop each entry with probability ``1 - density`` and divide the kept ones by
  ``density`` (so the expected update is unchanged), then ``Σ wᵢ ΔWᵢ``.
- ``dare_ties``: the DARE drop and rescale, then TIES' sign election and disjoint mean.

``density`` is in (0, 1]; 1 keeps everything (PEFT warns and skips pruning too). The DARE masks
come from ``generator``: ``torch.bernoulli`` on a float32 tensor of ``density``, one call per
update in order, which is what PEFT's ``random_pruning`` does with the global generator on
float32 updates. So PEFT's result after ``torch.manual_seed(seed)`` on float32 updates uses the
same masks as ours with ``torch.Generator().manual_seed(seed)``, for updates laid out (out, in)
as ours are: PEFT draws a Conv1D's or an embedding's mask on its transposed layout, so there
the masks differ (the same distribution, not the same draw).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "MERGERS",
    "SIGN_METHODS",
    "dare_linear",
    "dare_ties",
    "magnitude_mask",
    "magnitude_prune",
    "majority_sign_mask",
    "random_keep_mask",
    "ties",
    "weighted_sum",
]

SIGN_METHODS = ("total", "frequency")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the share of entries kept), got {density}")


def _stacked_weights(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``weights`` as a (n, 1, ..., 1) tensor that broadcasts over the stacked updates."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights; give one each")
    shape = (len(weights),) + (1,) * updates[0].dim()
    stacked = torch.tensor(list(weights), dtype=updates[0].dtype, device=updates[0].device)
    return stacked.reshape(shape)


def magnitude_mask(update: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the ``int(density · numel)`` entries of largest ``|update|``, 0 elsewhere (dtype and
    device of ``update``, same shape; density 1 keeps all)."""
    _check_density(density)
    if density >= 1.0:
        return torch.ones_like(update)
    flat_mask = torch.zeros(update.numel(), dtype=update.dtype, device=update.device)  # (d·k,)
    kept = torch.topk(update.abs().reshape(-1), k=int(density * update.numel())).indices
    flat_mask[kept] = 1
    return flat_mask.reshape(update.shape)


def random_keep_mask(
    update: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Bernoulli(density) 0/1 entries of ``update``'s shape, drawn in float32 from
    ``generator`` (see the module docstring) on the generator's device (the CPU for a
    ``torch.Generator()`` or None: the same draws whatever ``update``'s device), returned in
    ``update``'s dtype and on its device; density 1 keeps all and draws nothing."""
    _check_density(density)
    if density >= 1.0:
        return torch.ones_like(update)
    drawn_on = generator.device if generator is not None else torch.device("cpu")
    probabilities = torch.full(update.shape, density, dtype=torch.float32, device=drawn_on)
    mask = torch.bernoulli(probabilities, generator=generator)
    return mask.to(device=update.device, dtype=update.dtype)


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(n, ...) bool: where update i's sign equals the elected sign of that entry.
    ``stacked`` is (n, ...); ``method`` "total" (sign of the sum) or "frequency" (sign of the
    sum of signs); a zero total elects +1."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def weighted_sum(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ wᵢ ΔWᵢ``."""
    return (torch.stack(list(updates)) * _stacked_weights(updates, weights)).sum(dim=0)


def _disjoint_mean(
    kept: torch.Tensor, weights: Sequence[float], updates: Sequence[torch.Tensor], method: str
) -> torch.Tensor:
    """TIES' merge of the pruned updates ``kept`` (n, ...): per entry, the mean of ``wᵢ ΔWᵢ``
    over the updates agreeing with the sign elected from the unweighted ``kept``."""
    agree = majority_sign_mask(kept, method)
    weighted = kept * _stacked_weights(updates, weights)
    count = agree.sum(dim=0).clamp(min=1).to(kept.dtype)
    return (weighted * agree).sum(dim=0) / count


def magnitude_prune(
    updates: Sequence[torch.Tensor], weights: Sequence[float], density: float
) -> torch.Tensor:
    """Each update pruned to its largest ``density`` share by magnitude, then ``Σ wᵢ ΔWᵢ``."""
    return weighted_sum([u * magnitude_mask(u, density) for u in updates], weights)


def ties(
    updates: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim by magnitude, elect signs, disjoint mean."""
    kept = torch.stack([u * magnitude_mask(u, density) for u in updates])  # (n, d, k)
    return _disjoint_mean(kept, weights, updates, majority_sign_method)


def _dare(
    updates: Sequence[torch.Tensor], density: float, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Each update with entries dropped at rate ``1 - density`` and the rest divided by it."""
    return [u * random_keep_mask(u, density, generator) / density for u in updates]


def dare_linear(
    updates: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023): random drop and rescale, then ``Σ wᵢ ΔWᵢ``."""
    return weighted_sum(_dare(updates, density, generator), weights)


def dare_ties(
    updates: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE's drop and rescale, then TIES' sign election and disjoint mean."""
    kept = torch.stack(_dare(updates, density, generator))  # (n, d, k)
    return _disjoint_mean(kept, weights, updates, majority_sign_method)


Merger = Callable[..., torch.Tensor]
MERGERS: dict[str, Merger] = {
    "svd": weighted_sum,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
"""The methods that combine full updates (then cut back to a rank by SVD)."""
