"""PNG figures of update spectra (matplotlib with the non-interactive Agg backend).

- ``plot_spectra``: normalised singular values ``σ_i / σ_1`` (log scale) and the cumulative
  energy share ``sum_{j<=i} σ_j^2 / sum σ^2`` against i, one line per layer, coloured by module type.
- ``plot_effective_ranks``: rank at 90% energy and entropy effective rank by layer index, one
  line per module type.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lorakit.analysis.spectrum import Spectrum, entropy_rank

__all__ = ["plot_effective_ranks", "plot_spectra", "save_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as PNG atomically and close it (``lorakit.io.atomic.write_with``: a
    temporary file of its own in the target folder, fsynced, then renamed; runs writing into
    one folder at once never see each other's partial files). The figure is closed, and no
    temporary file is left, even when writing fails."""
    from lorakit.io.atomic import write_with

    try:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_with(
            path,
            lambda temporary: figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight"),
        )
    finally:
        _pyplot().close(figure)
    return path


def _colours(spectra: Sequence[Spectrum]) -> dict[str, object]:
    plt = _pyplot()
    types = sorted({s.module_type for s in spectra})
    cmap = plt.get_cmap("tab10")
    return {module_type: cmap(i % 10) for i, module_type in enumerate(types)}


def plot_spectra(
    spectra: Sequence[Spectrum], path: str | os.PathLike[str], title: str = "Spectrum of ΔW"
) -> Path:
    """Normalised singular values and cumulative energy per layer -> PNG at ``path``."""
    plt = _pyplot()
    colours = _colours(spectra)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labelled = set()
    for spectrum in spectra:
        values = spectrum.singular_values
        if len(values) == 0 or float(values[0]) == 0.0:
            continue
        index = torch.arange(1, len(values) + 1)
        label = None if spectrum.module_type in labelled else spectrum.module_type
        labelled.add(spectrum.module_type)
        colour = colours[spectrum.module_type]
        left.plot(
            index, (values / values[0]).clamp_min(1e-12), color=colour, alpha=0.6, label=label
        )
        energy = torch.cumsum(values**2, 0) / (values**2).sum()
        right.plot(index, energy, color=colour, alpha=0.6)
    left.set(yscale="log", xscale="log", xlabel="index i", ylabel="σ_i / σ_1", title=title)
    right.set(xscale="log", xlabel="rank r", ylabel="energy share kept", title="cumulative energy")
    for share in (0.9, 0.99):
        right.axhline(share, color="grey", linestyle=":", linewidth=1)
    if labelled:  # (an all-zero update draws no line: no legend to show)
        left.legend(fontsize=8)
    return save_figure(figure, path)


def plot_effective_ranks(
    spectra: Sequence[Spectrum], path: str | os.PathLike[str], title: str = "Effective rank of ΔW"
) -> Path:
    """Rank at 90% energy and entropy effective rank by layer, per module type -> PNG."""
    plt = _pyplot()
    colours = _colours(spectra)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    by_type: dict[str, list[Spectrum]] = {}
    for spectrum in spectra:
        by_type.setdefault(spectrum.module_type, []).append(spectrum)
    for module_type, group in sorted(by_type.items()):
        group = sorted(group, key=lambda s: (s.layer_index is None, s.layer_index or 0))
        layers = [s.layer_index if s.layer_index is not None else i for i, s in enumerate(group)]
        colour = colours[module_type]
        left.plot(
            layers, [s.energy_rank(0.9) for s in group], "o-", color=colour, label=module_type
        )
        right.plot(layers, [entropy_rank(s.singular_values) for s in group], "o-", color=colour)
    left.set(xlabel="layer", ylabel="rank at 90% energy", title=title)
    right.set(xlabel="layer", ylabel="entropy effective rank", title="exp(entropy of σ / Σσ)")
    if by_type:
        left.legend(fontsize=8)
    return save_figure(figure, path)
