"""Turn a full fine-tune into a LoRA adapter by truncated SVD.

For each linear layer, ``ΔW = W_ft - W0`` (d x k) = ``U diag(σ) V^T``. Keeping r directions,
with the adapter's scaling ``s`` (``functional.scaling``)::

    B = U_r diag(sqrt(σ_r)) / sqrt(s)    (d, r)
    A = diag(sqrt(σ_r)) V_r^T / sqrt(s)  (r, k)     so that  s B A = U_r diag(σ_r) V_r^T,

the best rank-r approximation (Eckart–Young). Its relative error is
``||ΔW - s B A||_F / ||ΔW||_F = sqrt(sum_{i>r} σ_i^2 / sum_i σ_i^2)``.
The rank is fixed, or chosen per layer as the smallest keeping a share of the energy (then the
config carries ``rank_pattern``). Everything else the fine-tune changed (biases, norms,
embeddings, a new head) is not captured by LoRA and is listed in ``Extraction.uncaptured``.

A linear layer whose weight is shared with another parameter (a head tied to the input
embedding, GPT-2's ``lm_head``) gets no LoRA: merging ``s B A`` into it would change the
embedding too, so the merged model would differ from the unmerged one. It is listed in
``uncaptured`` with ``"note": "tied to <other parameter>"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit import functional
from lorakit.analysis.extract_ranks import (
    config_rank,
    energy_ranks,
    extracted_config,
    fixed_rank,
    target_spec,
)
from lorakit.analysis.uncaptured import tied_linears, uncaptured_changes
from lorakit.analysis.updates import stream_linear_updates
from lorakit.config import LoraConfig

__all__ = [
    "ExtractedLayer",
    "Extraction",
    "apply_extraction",
    "extract_lora",
    "prefixed",
    "truncated_factors",
]


def truncated_factors(
    delta: torch.Tensor, rank: int, scale: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, k), B (d, r), relative Frobenius error)`` with ``s B A`` the best rank-r fit of ΔW."""
    u, sigma, vh = torch.linalg.svd(delta.detach().to(dtype), full_matrices=False)
    root = torch.sqrt(sigma[:rank] / scale)  # (r,)
    lora_B = u[:, :rank] * root  # (d, r)
    lora_A = root[:, None] * vh[:rank]  # (r, k)
    total = float((sigma**2).sum())
    error = math.sqrt(float((sigma[rank:] ** 2).sum()) / total) if total > 0 else 0.0
    return lora_A, lora_B, error


@dataclass
class ExtractedLayer:
    """One layer of an extraction: its rank, relative Frobenius error and size; ``capped``: the
    fixed rank asked for was above min(d, k), so the layer got r = min(d, k), a full-rank update
    whose (d + k) r parameters are at least the d k of ΔW itself."""

    name: str
    shape: tuple[int, int]
    rank: int
    relative_error: float
    parameters: int
    capped: bool = False

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class Extraction:
    """An extracted adapter: its config, ``{module name: (A, B)}`` (float32) and a report."""

    config: LoraConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layers: list[ExtractedLayer]
    dense_parameters: int
    uncaptured: dict[str, dict] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def relative_error(self) -> float:
        """The largest per-layer relative Frobenius error."""
        return max((layer.relative_error for layer in self.layers), default=0.0)

    @property
    def capped(self) -> list[str]:
        """The layers whose fixed rank was capped to min(d, k) (``ExtractedLayer.capped``)."""
        return [layer.name for layer in self.layers if layer.capped]

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "parameters": self.parameters,
            "bytes_float32": 4 * self.parameters,
            "dense_parameters": self.dense_parameters,
            "capped_layers": self.capped,
            "max_relative_error": self.relative_error,
            "layers": [layer.to_dict() for layer in self.layers],
            "uncaptured_changes": self.uncaptured,
        }


def _streamed_factors(
    base: nn.Module, finetuned: nn.Module, skipped: set[str], rank_and_scale
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[ExtractedLayer]]:
    """``(factors, layers)`` of every linear update, each ΔW (float64) made, cut to the rank
    ``rank_and_scale(name, (d, k))`` gives (with its scale s) and dropped before the next one."""
    factors, layers = {}, []
    for name, delta in stream_linear_updates(base, finetuned, torch.float64, skipped):
        rank, scale = rank_and_scale(name, tuple(delta.shape))
        lora_A, lora_B, error = truncated_factors(delta, rank, scale)
        factors[name] = (lora_A.float(), lora_B.float())
        size = functional.lora_parameter_count(delta.shape[0], delta.shape[1], rank)
        layers.append(ExtractedLayer(name, tuple(delta.shape), rank, error, size))
        del delta, lora_A, lora_B  # (one float64 ΔW alive at a time)
    return factors, layers


def _refuse_nothing_left(
    base: nn.Module, finetuned: nn.Module, new: Mapping[str, str], tied: Mapping[str, str]
) -> None:
    """``ValueError`` when no linear update is left: the two are not one model
    (``sources.refuse_incomparable``), only tied layers (``tied_linear_changes``) or newly
    initialised layers differ, or none does (naming any parameter only one model has)."""
    from lorakit.analysis.one_sided import one_sided_parameters, one_sided_summary
    from lorakit.analysis.sources import refuse_incomparable
    from lorakit.analysis.uncaptured import tied_linear_changes
    from lorakit.analysis.updates import missing_from

    refuse_incomparable(base, finetuned)
    changed_tied = tied_linear_changes(base, finetuned, tied, new)
    if changed_tied:
        listed = ", ".join(f"{name} (tied to {tied[name]})" for name in changed_tied)
        raise ValueError(
            "the only linear layers that differ between the base and the fine-tuned model "
            f"share their weight with another parameter: {listed}; a LoRA on a tied weight "
            "would change what it is tied to when merged, so extract gives them none and "
            "nothing is left to extract (`lorakit analyze --base --finetuned` shows their "
            "W_ft - W0); save the changed weight in full instead, e.g. modules_to_save"
        )
    if new:
        listed = ", ".join(f"{name} ({missing_from(which)})" for name, which in new.items())
        raise ValueError(
            "no linear layer differs between the base and the fine-tuned model but those "
            f"newly initialised at loading, which have no trained ΔW: {listed}; check --task "
            "and that both directories hold the weights of these layers"
        )
    one_sided = one_sided_summary(one_sided_parameters(base, finetuned))
    raise ValueError(
        f"no linear layer differs between the base and the fine-tuned model{one_sided}"
    )


def _check_arguments(rank: int | None, energy: float | None, lora_alpha: float | None) -> None:
    """``ValueError`` unless exactly one of ``rank`` (>= 1) and ``energy`` is given and
    ``lora_alpha`` is unset or positive (the factors are sqrt(S / s): a scale s <= 0 has none)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (an integer) or energy (a share in (0, 1])")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(
            f"lora_alpha must be a positive finite number for an extracted adapter, got "
            f"{lora_alpha}; leave it unset for lora_alpha = r"
        )


def extract_lora(
    base: nn.Module,
    finetuned: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    lora_alpha: float | None = None,
    exclude: Iterable[str] = (),
    newly_initialised: Mapping[str, str] | None = None,
) -> Extraction:
    """Extract a LoRA adapter for ``base`` approximating ``finetuned``'s linear-layer updates.

    Exactly one of ``rank`` (the same r everywhere, capped at min(d, k): such layers are marked
    ``capped`` and get ``rank_pattern`` entries; at r = min(d, k) a layer's (d + k) r
    parameters are no fewer than ΔW's d k) or ``energy`` (per layer, the smallest r keeping
    that share of ``||ΔW||_F^2``, capped at ``max_rank``). ``lora_alpha``
    defaults to the config's r; every layer's scale is ``lora_alpha / r`` (``extracted_config``).
    ``exclude``: module names left out (e.g. a new classification head, better saved in full);
    their changes are then listed in ``uncaptured``, as are those of linear layers whose weight
    is tied to another parameter (never given a LoRA, noted "tied to <other>").
    ``newly_initialised``: ``{module name: "base" | "fine-tuned" | "both"}``, modules whose
    weights were missing from that checkpoint (or both) and randomly initialised at loading;
    left out and noted.
    One float64 ΔW is alive at a time (with ``energy``, a first pass of singular values picks
    the ranks, a second makes the factors). ``ValueError`` when no linear layer differs,
    saying so when the two are not one model (``sources.refuse_incomparable``) or only tied or
    newly initialised layers differ. Parameters only one model has are listed in
    ``uncaptured`` (``one_sided.OneSidedParameter``).
    """
    _check_arguments(rank, energy, lora_alpha)
    new = dict(newly_initialised or {})
    tied = tied_linears(base, finetuned)
    # a layer of another shape (a resized head) is skipped here and reported by
    # uncaptured_changes (or, when no layer matches, by refuse_incomparable)
    skipped = set(exclude) | set(tied) | set(new)
    if rank is not None:
        rank_and_scale = fixed_rank(rank, float(lora_alpha if lora_alpha is not None else rank))
        factors, layers = _streamed_factors(base, finetuned, skipped, rank_and_scale)
        layers = [dataclasses.replace(layer, capped=rank > min(layer.shape)) for layer in layers]
        ranks = {layer.name: layer.rank for layer in layers}
        common = rank
    else:
        ranks = energy_ranks(base, finetuned, skipped, energy, max_rank)
        common = max(ranks.values(), default=1)
    if not ranks:
        _refuse_nothing_left(base, finetuned, new, tied)
    config = extracted_config(
        base, ranks, common, float(lora_alpha if lora_alpha is not None else common)
    )
    if rank is None:  # (second pass: the ranks the config gives)
        factors, layers = _streamed_factors(base, finetuned, skipped, config_rank(config))
    dense = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    uncaptured = uncaptured_changes(base, finetuned, set(ranks), tied, new)
    return Extraction(config, factors, layers, dense, uncaptured)


def prefixed(extraction: Extraction, prefix: str, model: nn.Module) -> Extraction:
    """``extraction`` (made on a body, e.g. a ``BertModel``) for ``model``, which holds that
    body under ``prefix`` (``bert`` in a ``BertForSequenceClassification``): every module and
    parameter name gets ``prefix.`` and the targets are chosen as ``model`` selects them.
    Values are unchanged; ``prefix`` "" gives the names as they are."""

    def rename(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    layers = [dataclasses.replace(layer, name=rename(layer.name)) for layer in extraction.layers]
    config = extraction.config.replace(
        target_modules=target_spec(model, [layer.name for layer in layers]),
        rank_pattern={rename(name): r for name, r in extraction.config.rank_pattern.items()},
        alpha_pattern={rename(name): a for name, a in extraction.config.alpha_pattern.items()},
    )
    return Extraction(
        config,
        {rename(name): factors for name, factors in extraction.factors.items()},
        layers,
        extraction.dense_parameters,
        {rename(name): change for name, change in extraction.uncaptured.items()},
    )


def apply_extraction(
    model: nn.Module, extraction: Extraction, adapter_name: str = "default"
) -> nn.Module:
    """Inject the extracted adapter into ``model`` (the base) and copy its tensors in."""
    from lorakit.inject import inject
    from lorakit.state import lora_layers

    model = inject(model, extraction.config, adapter_name=adapter_name)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name, (lora_A, lora_B) in extraction.factors.items():
            parameter_A, parameter_B = layers[name].adapter_parameters(adapter_name)[:2]
            parameter_A.copy_(lora_A.to(parameter_A.dtype))
            parameter_B.copy_(lora_B.to(parameter_B.dtype))
    return model
