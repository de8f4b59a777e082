"""The factors of one module of a combined adapter (``combining.combined.combine``).

Given a module's parts ``[(adapter, weight, factors)]`` (``ΔWᵢ = sᵢ Bᵢ Aᵢ``, weight ``wᵢ``) and
the output's scale ``s`` for it, ``module_factors`` returns ``(A, B, energy kept)`` with
``s B A`` the combination: ``cat`` stacks the factors exactly (``cat_factors``, balanced by a
power of two), the other methods merge the full ``ΔWᵢ`` (``combining.methods``) and cut the
result by SVD. ``module_ranks`` gives each module's output rank, ``check_writable`` refuses
factors no adapter file may hold (``FactorRangeError``), ``module_seed`` seeds DARE per module.
"""

from __future__ import annotations

import hashlib
import math

import torch

from lorakit.combining.arguments import PRUNING
from lorakit.combining.methods import MERGERS
from lorakit.errors import UserError
from lorakit.io.tensors import MAX_ABS_VALUE, unwritable

__all__ = [
    "FactorRangeError",
    "check_writable",
    "module_factors",
    "module_ranks",
    "module_seed",
]


class FactorRangeError(UserError):
    """A combined factor holds values no adapter file may hold (``unwritable``): the weights
    are too large. The server answers it as a 400 on ``merged_adapters.weights``."""


def module_seed(seed: int, module: str) -> int:
    """The DARE seed of one module: 60 bits of SHA-256 of ``"{seed}:{module}"``."""
    return int(hashlib.sha256(f"{seed}:{module}".encode()).hexdigest()[:15], 16)


def module_factors(
    name: str, parts, scale: float, rank: int, method, density, majority_sign_method, seed
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, k), B (d, r), energy kept)`` of module ``name`` combined from ``parts``
    (``[(adapter, weight, factors)]``), with ``s B A`` the combination at the output's scale
    ``s = scale``: ``cat`` stacks the factors exactly (energy 1); the other methods merge the
    weighted ``ΔWᵢ`` and cut the result to ``rank`` by SVD (energy ``1 - error²``)."""
    if method == "cat":
        lora_A, lora_B = _cat_factors(parts, scale)
        return lora_A, lora_B, 1.0
    from lorakit.analysis.extract import truncated_factors

    delta = _merged_delta(name, parts, method, density, majority_sign_method, seed)
    lora_A, lora_B, error = truncated_factors(delta, rank, scale)
    return lora_A, lora_B, 1.0 - error**2


def _cat_factors(parts, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = [2^eᵢ Aᵢ; …]``, ``B = [cᵢ 2^-eᵢ Bᵢ, …]`` in float64 with ``cᵢ = wᵢ sᵢ / s`` and
    ``eᵢ = _balanced_exponent(cᵢ)`` (see the module docstring): each ``Bᵢ Aᵢ`` scaled by
    ``cᵢ``, with the scale shared between the two factors by an exact power of two."""
    blocks_A, blocks_B = [], []
    for _, weight, factors in parts:
        c = weight * factors.scale / scale
        exponent = _balanced_exponent(c)
        blocks_A.append(factors.lora_A.double() * math.ldexp(1.0, exponent))  # exact
        blocks_B.append(factors.lora_B.double() * math.ldexp(c, -exponent))  # (c 2^-e exact)
    return torch.cat(blocks_A, dim=0), torch.cat(blocks_B, dim=1)  # (Σr, k), (d, Σr)


def _balanced_exponent(c: float) -> int:
    """``e`` with ``2^e`` within a factor √2 of ``√|c|`` (``|c| = m 2^x``, m in [1/2, 1):
    ``e = ⌊x / 2⌋``); 0 for c = 0 and for 1/2 <= |c| < 2, where A is kept as it is."""
    return math.frexp(c)[1] // 2


def check_writable(name: str, factors: tuple[torch.Tensor, torch.Tensor], parts) -> None:
    """``FactorRangeError`` when a factor of module ``name`` (as it would be saved) is
    ``unwritable``, naming the weights of the adapters ``parts`` combined into it."""
    for label, tensor in zip(("lora_A", "lora_B"), factors, strict=True):
        if unwritable(tensor):
            weights = ", ".join(f"{source.label}: {weight:g}" for source, weight, _ in parts)
            raise FactorRangeError(
                f"combine: the weights ({weights}) give module {name}'s {label} values beyond "
                f"+-{MAX_ABS_VALUE:g} (or inf/NaN), which no adapter file may hold (lorakit "
                "refuses to load such a file); use smaller weights"
            )


def _merged_delta(name, parts, method, density, majority_sign_method, seed) -> torch.Tensor:
    updates = [factors.delta() for _, _, factors in parts]  # each (d, k) float64
    weights = [weight for _, weight, _ in parts]
    options: dict[str, object] = {}
    if method in PRUNING:
        options["density"] = density
    if method in ("ties", "dare_ties"):
        options["majority_sign_method"] = majority_sign_method
    if method.startswith("dare"):
        options["generator"] = torch.Generator().manual_seed(module_seed(seed, name))
    return MERGERS[method](updates, weights, **options)


def module_ranks(contributions, method: str, rank: int | None) -> dict[str, int]:
    ranks = {}
    for name, parts in contributions.items():
        total = sum(factors.rank for _, _, factors in parts)
        d, k = parts[0][2].shape
        if method == "cat":
            ranks[name] = total
        else:  # the exact sum has rank <= Σ rᵢ; a pruned one can have up to min(d, k)
            ranks[name] = min(rank, d, k, total if method == "svd" else min(d, k))
    return ranks
