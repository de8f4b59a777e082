"""Intrinsic dimension: train only a d-dimensional θ_d inside a fixed random subspace.

Li et al. 2018 / Aghajanyan et al. 2020: the chosen parameters θ_D (D numbers in all) become

    θ_D = θ_0 + P θ_d                        (plain random subspace)
    θ_D^(i) = θ_0^(i) + λ_i (P θ_d)^(i)      (SAID: one learned scalar λ_i per tensor i)

with P (D x d) a Fastfood transform that is never stored densely. θ_d (zero-padded to L, the
next power of two >= d) goes through n = ceil(D / L) independent blocks, stacked and cut to D::

    P_b = H G_b Π_b H B_b / sqrt(L ||G_b||^2 n)      (L x L)

H is the (unnormalised, ±1) Walsh–Hadamard matrix applied in O(L log L), B_b a random ±1
diagonal, Π_b a random permutation, G_b a Gaussian diagonal. Each block's columns have norm
exactly 1/sqrt(n), so the columns of P have unit norm when L divides D; the cut of the last
block shortens them where D is not much larger than L (norms 0.72-0.75 at d = 1,000,
D = 1,100; 0.995-1.000 at D = 10.6M, experiment 5b's). Memory: O(D) for the random diagonals
and permutations, never O(D d). The transform runs in float32 at least (in float16 its
intermediate values, about L |θ_d|, overflow), and the reparametrised tensors must be float32
or float64: SAID's steps, about |θ_d| / sqrt(D) per number, are below bfloat16's resolution of
θ_0, so much of them would be rounded away (16% of a step in a bfloat16 layer; checked when
wrapping and again at every call, since the model may be cast after it was wrapped).
d90 is the smallest d whose score reaches 90% of full fine-tuning's (``d90``, the paper's
definition); ``d90_of_gain`` asks for 90% of the gain over the frozen baseline instead, and
``bootstrap_d90`` gives both with a percentile interval from resampled seeds.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lorakit.analysis import intrinsic_checks as checks

__all__ = [
    "Fastfood",
    "IntrinsicDimension",
    "bootstrap_d90",
    "d90",
    "d90_of_gain",
    "hadamard_transform",
]


@functools.lru_cache(maxsize=16)
def _sylvester(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (size x size) ±1 Sylvester–Hadamard matrix (size a power of two)."""
    matrix = torch.ones(1, 1, dtype=dtype, device=device)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _fwht(x: torch.Tensor, factor_bits: int = 6) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dim (a power of two L).

    ``H_L = H_{f1} ⊗ H_{f2} ⊗ ...`` with factors of at most 2^factor_bits: the last dim is viewed
    as a tensor of those sizes and each axis is multiplied by its small Hadamard matrix, i.e. the
    butterfly stages grouped into BLAS-sized chunks; O(L log L) work.
    """
    length = x.shape[-1]
    if length & (length - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {length}")
    bits, sizes = length.bit_length() - 1, []
    while bits > 0:
        sizes.append(1 << min(bits, factor_bits))
        bits -= min(bits, factor_bits)
    y = x.reshape(-1, *sizes)  # (batch, f1, f2, ...)
    for axis, size in enumerate(sizes, start=1):
        factor = _sylvester(size, x.dtype, x.device)
        y = torch.movedim(torch.movedim(y, axis, -1) @ factor, -1, axis)
    return y.reshape(x.shape)


class _Hadamard(torch.autograd.Function):
    """H x with H symmetric: the backward is H applied to the gradient (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fwht(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _fwht(grad)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x H`` along the last dim (H the ±1 Sylvester–Hadamard matrix, ``H H = L I``)."""
    return _Hadamard.apply(x)


class Fastfood(nn.Module):
    """The fixed linear map P: R^d -> R^D above (buffers only, nothing trainable).

    ``forward(theta_d)``: (d,) -> (D,). Random state comes from ``seed`` (an int) alone. d and D
    must be positive integers; d > D is allowed here (P is then rank-deficient).
    """

    def __init__(self, dimension: int, total: int, seed: int = 0) -> None:
        super().__init__()
        dimension = checks.positive_int(dimension, "d")
        total = checks.positive_int(total, "D")
        self.dimension, self.total = dimension, total
        self.block = 1 << max(dimension - 1, 0).bit_length()  # L: power of two >= d
        blocks = math.ceil(total / self.block)
        generator = torch.Generator().manual_seed(checks.integer_seed(seed, torch_generator=True))
        signs = torch.randint(0, 2, (blocks, self.block), generator=generator) * 2 - 1
        self.register_buffer("signs", signs.to(torch.int8))  # B: (n, L)
        perm = torch.argsort(torch.rand(blocks, self.block, generator=generator), dim=1)
        self.register_buffer("permutation", perm)  # Π: (n, L)
        gauss = torch.randn(blocks, self.block, generator=generator)
        self.register_buffer("gaussian", gauss)  # G: (n, L)
        norm = torch.sqrt(self.block * (gauss.double() ** 2).sum(1, keepdim=True) * blocks)
        self.register_buffer("normaliser", norm)  # (n, 1)

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        """P θ_d (D,), in θ_d's dtype or float32, whichever is wider."""
        checks.refuse_narrow_tables(self.normaliser.dtype)
        dtype = torch.promote_types(theta_d.dtype, torch.float32)
        device = theta_d.device
        padded = torch.zeros(self.block, dtype=dtype, device=device)
        positions = torch.arange(self.dimension, device=device)
        padded = padded.index_copy(0, positions, theta_d.to(dtype))  # (L,)
        x = self.signs.to(dtype) * padded  # B x: (n, L)
        x = hadamard_transform(x)  # H B x
        x = torch.gather(x, 1, self.permutation)  # Π H B x
        x = hadamard_transform(self.gaussian.to(dtype) * x)  # H G Π H B x
        return (x / self.normaliser.to(dtype)).reshape(-1)[: self.total]  # (D,)


class IntrinsicDimension(nn.Module):
    """Reparametrise chosen parameters of ``model`` as ``θ_0 + λ P θ_d`` and train only θ_d (and λ).

    ``parameter_names``: the parameters to reparametrise (default: all that require grad). They
    are frozen (θ_0); any other parameter keeps its ``requires_grad`` (e.g. a new classification
    head may train directly; it is then not counted in d). ``said=True`` adds one scalar λ_i per
    tensor (initialised to 1), counted in ``trainable_dimension``. Calls go through
    ``torch.func.functional_call``, so the model's own tensors are never modified.

    ``dimension`` (d) must be a positive integer no larger than D, the number of reparametrised
    numbers. Everything is checked, and P built, before the chosen parameters are frozen, so a
    failed construction leaves the model as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        dimension: int,
        parameter_names: Sequence[str] | None = None,
        *,
        said: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        dimension = checks.positive_int(dimension, "d")
        named = dict(model.named_parameters())
        names = checks.chosen_parameters(named, parameter_names)
        checks.refuse_narrow(named, names)
        sizes = [named[name].numel() for name in names]
        checks.refuse_above_total(dimension, sum(sizes))
        projection = Fastfood(dimension, sum(sizes), seed=seed)
        self.model, self.names, self.sizes, self.projection = model, names, sizes, projection
        self.theta_d = nn.Parameter(torch.zeros(dimension))
        self.scales = nn.Parameter(torch.ones(len(self.names))) if said else None
        for name in self.names:  # last: a failed construction above leaves the model untouched
            named[name].requires_grad_(False)

    @property
    def trainable_dimension(self) -> int:
        """d as Aghajanyan et al. count it: len(θ_d) plus the SAID scalars."""
        return self.theta_d.numel() + (0 if self.scales is None else self.scales.numel())

    def reparametrised(self) -> dict[str, torch.Tensor]:
        """``{name: θ_0 + λ_i (P θ_d)_i}`` for the chosen parameters (differentiable in θ_d, λ).

        ``TypeError`` when a θ_0 is no longer float32 / float64 (the model was cast after it was
        wrapped, e.g. ``wrapper.model.to(torch.bfloat16)``): the steps would be rounded away.
        """
        named = dict(self.model.named_parameters())
        checks.refuse_narrow(named, self.names)
        flat = self.projection(self.theta_d)  # (D,)
        chunks = torch.split(flat, self.sizes)
        params = {}
        for index, (name, chunk) in enumerate(zip(self.names, chunks, strict=True)):
            base = named[name]
            step = chunk.view(base.shape).to(base.dtype)
            if self.scales is not None:
                step = self.scales[index] * step
            params[name] = base + step
        return params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.reparametrised(), args, kwargs, strict=False)


TIE_TOLERANCE = 1e-9
"""How far below ``threshold * full`` a score may be in floating point and still reach it:
accuracies are multiples of 1/n, so a score exactly at 90% is common, and ``0.9 * 0.80`` is
0.7200000000000001 in floating point (far below any accuracy's resolution)."""


def d90(scores: Mapping[int, float], full_score: float, threshold: float = 0.9) -> int | None:
    """Smallest d with ``scores[d] >= threshold * full_score`` (None if no d reaches it); a
    score equal to the target up to rounding (``TIE_TOLERANCE``) reaches it.

    Keys are read as the ints d: whole numbers (300.0 too) and int strings (a results JSON's);
    ``threshold`` must be in (0, 1] and ``full_score`` finite (``intrinsic_checks`` names what
    is wrong otherwise).
    """
    scores = checks.dimension_keys(scores)
    full_score = checks.finite_score(full_score, "full_score")
    threshold = checks.fraction_threshold(threshold)
    target = threshold * full_score - TIE_TOLERANCE * max(1.0, abs(full_score))
    reached = [d for d, score in scores.items() if score >= target]
    return min(reached) if reached else None


def d90_of_gain(
    scores: Mapping[int, float], full_score: float, frozen_score: float, threshold: float = 0.9
) -> int | None:
    """Smallest d with ``scores[d] - frozen >= threshold * (full - frozen)``.

    None when no d reaches it, or when full fine-tuning does not beat the frozen baseline (the
    gain is then undefined). Arguments are checked as in ``d90``.
    """
    scores, threshold = checks.dimension_keys(scores), checks.fraction_threshold(threshold)
    full_score = checks.finite_score(full_score, "full_score")
    frozen_score = checks.finite_score(frozen_score, "frozen_score")
    if full_score <= frozen_score:
        return None
    gains = {d: score - frozen_score for d, score in scores.items()}
    return d90(gains, full_score - frozen_score, threshold)


def bootstrap_d90(
    runs: Mapping[int, Sequence[float]],
    full: Sequence[float],
    frozen: Sequence[float],
    *,
    resamples: int = 2000,
    seed: int | None = 0,
    threshold: float = 0.9,
) -> dict[str, dict]:
    """Both d90 definitions on the seed means, with a bootstrap over seeds.

    ``runs[d]``: one score per seed at dimension d; ``full`` / ``frozen``: one score per seed of
    the two baselines. Each resample draws, with replacement, as many seeds as each setting has
    (independently per setting) and recomputes d90 on the resampled means. Returns, for
    ``"of_full"`` (the paper's: 90% of the full fine-tune's score) and ``"of_gain"`` (90% of the
    gain over the frozen baseline): ``point`` (on the plain means), ``low`` / ``high`` (2.5th /
    97.5th percentile of the resampled d90, a d never reached counting as +inf, reported as None)
    and ``undefined`` (the fraction of resamples where no d reaches the threshold). ``runs``'
    keys are read as in ``d90``; scores may be lists, tuples or 1-D arrays, the baselines'
    finite. ``seed`` (an int) fixes the resamples; None draws fresh ones at every call.
    """
    runs, full, frozen = checks.bootstrap_scores(runs, full, frozen)
    resamples, threshold = checks.resample_count(resamples), checks.fraction_threshold(threshold)
    rng = random.Random(checks.optional_seed(seed))

    def draw(values: Sequence[float]) -> float:
        return statistics.fmean(rng.choice(values) for _ in values)

    def both(curve, full_mean, frozen_mean) -> tuple[int | None, int | None]:
        return (
            d90(curve, full_mean, threshold),
            d90_of_gain(curve, full_mean, frozen_mean, threshold),
        )

    point = both(
        {d: statistics.fmean(v) for d, v in runs.items()}, *map(statistics.fmean, (full, frozen))
    )
    samples: list[tuple[int | None, int | None]] = []
    for _ in range(resamples):
        curve = {d: draw(values) for d, values in runs.items()}
        samples.append(both(curve, draw(full), draw(frozen)))
    out = {}
    for index, key in enumerate(("of_full", "of_gain")):
        values = sorted(math.inf if s[index] is None else s[index] for s in samples)
        low, high = values[int(0.025 * (resamples - 1))], values[int(0.975 * (resamples - 1))]
        out[key] = {
            "point": point[index],
            "low": None if math.isinf(low) else int(low),
            "high": None if math.isinf(high) else int(high),
            "undefined": sum(math.isinf(v) for v in values) / resamples,
        }
    return out
