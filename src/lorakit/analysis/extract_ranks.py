"""The ranks and scales of a LoRA extraction (``analysis.extract``) and the config that
records them.

Per layer ``(name, (d, k)) -> (r, s)``: a fixed rank, ``r = min(rank, d, k)`` with one scale
``s = alpha / rank`` (``fixed_rank``); or, with ``energy``, the smallest r keeping that share of
``||ΔW||_F^2`` (``energy_ranks``, capped at ``max_rank`` and min(d, k)), then as the config gives
it (``config_rank``). The config (``extracted_config``): ``r`` the common rank, the others in
``rank_pattern``, each with an ``alpha_pattern`` entry keeping the file's one scale
(``alpha_i / r_i = alpha / rank``), and ``target_modules`` as module types where they select
exactly the layers (``target_spec``).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import functional
from lorakit.analysis.spectrum import energy_rank
from lorakit.analysis.updates import stream_linear_updates
from lorakit.config import LoraConfig

__all__ = ["config_rank", "energy_ranks", "extracted_config", "fixed_rank", "target_spec"]


def target_spec(model: nn.Module, names: list[str]) -> list[str]:
    """Module types (``q_proj``) when they select exactly ``names`` in ``model``, else full names."""
    from lorakit.targets import find_targets

    types = sorted({name.rsplit(".", 1)[-1] for name in names})
    if sorted(find_targets(model, LoraConfig(target_modules=types))) == sorted(names):
        return types
    return sorted(names)


def fixed_rank(rank: int, alpha: float):
    """``(name, (d, k)) -> (r, s)`` with r = min(rank, d, k) and s = ``alpha / rank`` for every
    layer, a capped one too (its ``alpha_pattern`` entry, ``extracted_config``, keeps that s)."""
    scale = functional.scaling(rank, alpha, False)

    def rank_and_scale(name: str, shape: tuple[int, int]) -> tuple[int, float]:
        return min(rank, *shape), scale

    return rank_and_scale


def extracted_config(base: nn.Module, ranks: dict[str, int], rank: int, alpha: float) -> LoraConfig:
    """The adapter's config: r = ``rank``, ``ranks`` that differ in ``rank_pattern``, and for
    each of those an ``alpha_pattern`` entry ``alpha * r_i / rank`` keeping the file's one
    scale ``alpha / rank`` (``alpha_i / r_i = alpha / rank``). Readers that apply one
    ``lora_alpha / r`` to every module (LoRAX, vLLM before it read the patterns) then compute
    the same ΔW as PEFT; without it they scaled a rank-2 layer of a rank-6 file by a third."""
    rank_pattern = {name: r for name, r in ranks.items() if r != rank}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_spec(base, list(ranks)),
        rank_pattern=rank_pattern,
        alpha_pattern={name: alpha * r / rank for name, r in rank_pattern.items()},
    )


def config_rank(config: LoraConfig):
    """``(name, (d, k)) -> (r, s)`` as ``config`` gives them (``rank_for``, ``alpha_for``)."""

    def rank_and_scale(name: str, shape: tuple[int, int]) -> tuple[int, float]:
        layer_rank = config.rank_for(name)
        return layer_rank, functional.scaling(layer_rank, config.alpha_for(name), config.use_rslora)

    return rank_and_scale


def energy_ranks(
    base: nn.Module, finetuned: nn.Module, skipped: set[str], energy: float, max_rank: int | None
) -> dict[str, int]:
    """First pass with ``energy``: per layer, the smallest r keeping that share of
    ``||ΔW||_F^2`` (at least 1, capped at ``max_rank`` and min(d, k)), one ΔW at a time."""
    ranks = {}
    for name, delta in stream_linear_updates(base, finetuned, torch.float64, skipped):
        chosen = max(1, energy_rank(torch.linalg.svdvals(delta), energy))
        ranks[name] = min(chosen, max_rank or chosen, *delta.shape)
        del delta
    return ranks
