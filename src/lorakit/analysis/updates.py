"""The weight updates of a fine-tune: ``ΔW = W_ft - W0`` for every linear layer of two models.

A layer counts when both models have it (by module name) with one shape; each weight is read as
(d, k) (transformers' ``Conv1D`` stores (k, d)). A layer of another shape in the fine-tuned model
(a resized vocabulary's head, a new classification head) has no ``ΔW``: it is left out and named
(``reshaped_layers``), unless no shared layer has its shape, which means the two are not one
model. ``stream_linear_updates`` feeds both the spectra (``update_spectra``) and
``extract_lora`` one layer at a time; a layer newly initialised at loading (missing from its
checkpoint) is left out by the caller (``NewLayer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.analysis.spectrum import Spectrum, refuse_non_finite, spectrum_of_matrix

__all__ = [
    "NewLayer",
    "ReshapedLayer",
    "linear_updates",
    "linear_weights",
    "missing_from",
    "reshaped_layers",
    "stream_linear_updates",
    "update_spectra",
]

SharedLinear = tuple[str, torch.Tensor, torch.Tensor]  # (name, W0, W_ft), each (d, k)


def linear_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module name, weight as (d, k))`` of every ``nn.Linear`` and transformers ``Conv1D``."""
    from lorakit.layers.linear import is_conv1d

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module.weight
        elif is_conv1d(module):
            yield name, module.weight.T


@dataclass(frozen=True)
class ReshapedLayer:
    """A linear layer of both models whose weight has another shape in the fine-tuned one (a
    resized vocabulary's head, a new classification head): ``W_ft - W0`` does not exist, so it
    is left out of ``update_spectra`` and named in reports. Shapes are (d, k)."""

    name: str
    base_shape: tuple[int, int]
    finetuned_shape: tuple[int, int]

    @property
    def reason(self) -> str:
        base, tuned = ("x".join(map(str, s)) for s in (self.base_shape, self.finetuned_shape))
        return f"shape {base} in the base, {tuned} in the fine-tuned model: no W_ft - W0"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "base_shape": list(self.base_shape),
            "finetuned_shape": list(self.finetuned_shape),
            "reason": self.reason,
        }

    def error(self) -> ValueError:
        """The refusal when no layer matches: the two are not one model."""
        return ValueError(
            f"layer {self.name!r} has shape {self.base_shape} in the base but "
            f"{self.finetuned_shape} in the fine-tuned model; they are not the same model"
        )


def missing_from(checkpoint: str) -> str:
    """Which checkpoint lacks a module, in words: ``"base"`` -> "not in the base checkpoint",
    ``"fine-tuned"`` likewise, ``"both"`` -> "in neither the base nor the fine-tuned
    checkpoint"."""
    if checkpoint == "both":
        return "in neither the base nor the fine-tuned checkpoint"
    return f"not in the {checkpoint} checkpoint"


@dataclass(frozen=True)
class NewLayer:
    """A layer whose weights were missing from a checkpoint (``checkpoint``: ``"base"``,
    ``"fine-tuned"`` or ``"both"``) and randomly initialised when it loaded (a causal LM's
    checkpoint loaded for sequence classification has no ``score``): ``W_ft - W0`` would be a
    trained weight (or noise) minus noise, different at every run, so the layer is left out and
    named in reports."""

    name: str
    checkpoint: str

    @property
    def reason(self) -> str:
        return f"{missing_from(self.checkpoint)} (newly initialised): not analysed"

    def to_dict(self) -> dict:
        return {"name": self.name, "checkpoint": self.checkpoint, "reason": self.reason}


def _shared_linears(
    base: nn.Module, finetuned: nn.Module, names: Iterable[str] | None
) -> list[SharedLinear]:
    """``(name, W0, W_ft)``, each (d, k), of the linear layers in both models (in ``names``)."""
    tuned = dict(linear_weights(finetuned))
    wanted = None if names is None else set(names)
    return [
        (name, weight, tuned[name])
        for name, weight in linear_weights(base)
        if name in tuned and (wanted is None or name in wanted)
    ]


def _reshaped(shared: list[SharedLinear]) -> list[ReshapedLayer]:
    return [
        ReshapedLayer(name, tuple(weight.shape), tuple(tuned.shape))
        for name, weight, tuned in shared
        if tuned.shape != weight.shape
    ]


def _updates(
    shared: list[SharedLinear], dtype: torch.dtype, exclude: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, W_ft - W0)`` in ``dtype`` of the ``shared`` layers of one shape that differ, but
    those in ``exclude``, one at a time (a caller that needs one only holds one: a 7B model's
    updates in float64 are 56 GB); ``ValueError`` naming a layer holding NaN / inf (its SVD
    would fail)."""
    excluded = set(exclude)
    for name, weight, tuned in shared:
        if name in excluded or tuned.shape != weight.shape:
            continue
        refuse_non_finite(name, weight, tuned)
        delta = tuned.detach().to(dtype) - weight.detach().to(dtype)
        if torch.any(delta):
            yield name, delta
        del delta  # (before the next one is made: one alive at a time)


def reshaped_layers(
    base: nn.Module, finetuned: nn.Module, names: Iterable[str] | None = None
) -> list[ReshapedLayer]:
    """The linear layers of both models (in ``names``) whose weight shapes differ."""
    return _reshaped(_shared_linears(base, finetuned, names))


def linear_updates(
    base: nn.Module,
    finetuned: nn.Module,
    dtype: torch.dtype = torch.float64,
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """``{name: W_ft - W0}`` (d, k) of the linear layers both models have with one shape and
    that the fine-tune changed, but those in ``exclude``, in the base's module order; a layer of
    another shape is skipped (``reshaped_layers`` names it). ``ValueError`` naming a layer
    holding NaN / inf."""
    return dict(stream_linear_updates(base, finetuned, dtype, exclude))


def stream_linear_updates(
    base: nn.Module,
    finetuned: nn.Module,
    dtype: torch.dtype = torch.float64,
    exclude: Iterable[str] = (),
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, W_ft - W0)`` (d, k) as ``linear_updates`` has them, made one at a time: a
    caller that drops each before asking for the next holds one layer's update at most."""
    return _updates(_shared_linears(base, finetuned, None), dtype, exclude)


def update_spectra(
    base: nn.Module,
    finetuned: nn.Module,
    dtype: torch.dtype = torch.float64,
    names: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[Spectrum]:
    """Spectra of ``ΔW = W_ft - W0`` for every linear layer present in both models.

    Layers whose weights are identical (untouched by fine-tuning) are skipped; ``names``
    restricts the analysis to those modules and ``exclude`` leaves those out (layers newly
    initialised at loading). A layer of another shape beside layers that match
    (a resized head) is skipped too: ``reshaped_layers`` names them. ``ValueError`` naming the
    first layer when every shared layer has another shape (not the same model), or naming a
    layer holding NaN / inf.
    """
    shared = _shared_linears(base, finetuned, names)
    reshaped = _reshaped(shared)
    if reshaped and len(reshaped) == len(shared):
        raise reshaped[0].error()
    spectra = []
    for name, delta in _updates(shared, dtype, exclude):
        spectra.append(spectrum_of_matrix(name, delta, dtype))
        del delta  # (one update alive at a time)
    return spectra
