"""Per-layer reports of update spectra (JSON, a readable table) and rank advice per module type.

Rank advice: for the layers of one module type (all ``q_proj``, ...) with singular values
``σ^(l)``, a uniform rank r keeps the share
``sum_l sum_{i<=r} (σ_i^(l))^2 / sum_l sum_i (σ_i^(l))^2`` of the type's update energy; the advised
rank is the smallest r reaching the chosen share. ``max_layer_rank`` is the stricter answer (the
largest per-layer ``energy_rank``: every single layer keeps the share).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.analysis.one_sided import OneSidedParameter, format_one_sided
from lorakit.analysis.spectrum import Spectrum
from lorakit.analysis.updates import NewLayer, ReshapedLayer

LeftOut = ReshapedLayer | NewLayer | OneSidedParameter

__all__ = [
    "RankAdvice",
    "format_left_out",
    "format_table",
    "rank_advice",
    "share_label",
    "spectra_report",
]


@dataclass
class RankAdvice:
    """Advised LoRA rank for one module type at a given energy share."""

    module_type: str
    share: float
    rank: int
    max_layer_rank: int
    layers: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _by_type(spectra: Sequence[Spectrum]) -> dict[str, list[Spectrum]]:
    groups: dict[str, list[Spectrum]] = {}
    for spectrum in spectra:
        groups.setdefault(spectrum.module_type, []).append(spectrum)
    return groups


def _uniform_rank(spectra: Sequence[Spectrum], share: float) -> int:
    """Smallest r such that truncating every layer to rank r keeps ``share`` of the total energy."""
    longest = max(len(s.singular_values) for s in spectra)
    kept = torch.zeros(longest, dtype=torch.float64)
    for spectrum in spectra:
        energy = spectrum.singular_values.to(torch.float64) ** 2
        cumulative = torch.cumsum(energy, 0)
        last = float(cumulative[-1]) if len(cumulative) else 0.0
        padded = torch.full((longest,), last, dtype=torch.float64)
        padded[: len(cumulative)] = cumulative
        kept += padded
    total = float(kept[-1])
    if total == 0.0:
        return 0
    target = torch.tensor(share * total * (1 - 1e-12), dtype=torch.float64)
    return min(int(torch.searchsorted(kept, target)) + 1, longest)


def share_label(share: float) -> str:
    """The energy share as text that reads back as exactly that float: the short ``f"{share:g}"``
    ("0.9", "0.99", "1") when it does, else ``repr`` ("0.99000001", where ``:g`` would print
    "0.99" and name another share). Distinct shares get distinct labels, so one share's advice
    never overwrites another's under the same JSON key."""
    short = f"{share:g}"
    return short if float(short) == share else repr(share)


def rank_advice(spectra: Sequence[Spectrum], share: float = 0.9) -> list[RankAdvice]:
    """The smallest uniform rank per module type keeping ``share`` of that type's update energy."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"energy share must be in (0, 1], got {share}")
    return [
        RankAdvice(
            module_type=module_type,
            share=share,
            rank=_uniform_rank(group, share),
            max_layer_rank=max(s.energy_rank(share) for s in group),
            layers=len(group),
        )
        for module_type, group in sorted(_by_type(spectra).items())
    ]


def spectra_report(
    spectra: Sequence[Spectrum],
    shares: Sequence[float] = (0.9, 0.99),
    max_values: int = 64,
    left_out: Sequence[LeftOut] = (),
) -> dict:
    """JSON-ready report: one entry per layer, plus rank advice per module type per share (keyed by
    ``share_label(share)``: "0.9", "0.99", ... , one entry per distinct share), and
    ``left_out``: the layers not analysed and why (``ReshapedLayer.to_dict``: a fine-tune's
    resized head; ``NewLayer.to_dict``: weights newly initialised at loading;
    ``OneSidedParameter.to_dict``: a parameter only one model has, by parameter name).

    Each layer lists its first ``max_values`` singular values (all with None), with
    ``singular_value_count`` and ``singular_values_truncated`` saying whether that is all of
    them; the ranks and norms are computed from all."""
    return {
        "layers": [s.to_dict(max_values=max_values) for s in spectra],
        "advice": {
            share_label(share): [a.to_dict() for a in rank_advice(spectra, share)]
            for share in shares
        },
        "left_out": [layer.to_dict() for layer in left_out],
    }


def format_left_out(left_out: Sequence[LeftOut]) -> str:
    """One line per layer not analysed and why, then the parameters only one model has (the
    first few, ``one_sided.format_one_sided``); "" when none."""
    headers = {
        ReshapedLayer: "left out (another shape in the fine-tuned model, e.g. a resized vocabulary):",
        NewLayer: "left out (missing from a checkpoint, so randomly initialised at loading):",
    }
    lines = []
    for kind, header in headers.items():
        layers = [layer for layer in left_out if isinstance(layer, kind)]
        if layers:
            lines += [header, *(f"  {layer.name}: {layer.reason}" for layer in layers)]
    lines += format_one_sided([p for p in left_out if isinstance(p, OneSidedParameter)])
    return "\n".join(lines)


def format_table(spectra: Sequence[Spectrum]) -> str:
    """A fixed-width table: layer, shape, max rank, rank at 90/99% energy, entropy and stable rank."""
    header = (
        f"{'layer':<48} {'shape':>11} {'max r':>6} {'r90':>5} {'r99':>5} {'erank':>7} {'srank':>7}"
    )
    lines = [header, "-" * len(header)]
    for spectrum in spectra:
        row = spectrum.to_dict(max_values=1)
        shape = "x".join(str(n) for n in row["shape"])
        name = row["name"] if len(row["name"]) <= 48 else "..." + row["name"][-45:]
        lines.append(
            f"{name:<48} {shape:>11} {row['max_rank']:>6} {row['rank_90']:>5} "
            f"{row['rank_99']:>5} {row['entropy_rank']:>7.2f} {row['stable_rank']:>7.2f}"
        )
    advice90 = {a.module_type: a for a in rank_advice(spectra, 0.9)} if spectra else {}
    advice99 = {a.module_type: a for a in rank_advice(spectra, 0.99)} if spectra else {}
    if advice90:
        lines += ["", f"{'module type':<26} {'layers':>6} {'r @90%':>7} {'r @99%':>7}"]
        for module_type, advice in advice90.items():
            lines.append(
                f"{module_type:<26} {advice.layers:>6} {advice.rank:>7} "
                f"{advice99[module_type].rank:>7}"
            )
    return "\n".join(lines)
