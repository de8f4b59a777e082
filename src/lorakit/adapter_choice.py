"""Choosing adapters for one call, without touching any state: ``use_adapters``, ``disabled``.

Within the block only this model and only the calling thread / task compute with the chosen
adapters (``lorakit.layers.per_call``); gradient checkpointing's recomputation in a later
``backward`` keeps the block's choice. ``disabled`` gives the base model's output exactly,
without touching any weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave, adapter_override
from lorakit.layers.per_call import ChoiceKeepingCheckpoint
from lorakit.state import (
    _refuse_two_copies,
    _require,
    adapter_configs,
    adapter_name_list,
    walk_modules,
)

__all__ = ["adapters_off", "disabled", "use_adapters", "warn_trained_biases"]


@contextmanager
def use_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, ``model``'s forwards use exactly ``adapter_names`` (``[]``: the base
    model). Nothing on the model changes; only this model and only the calling thread / task
    are affected (other models keep their active adapters, even in the same block)."""
    adapter_names = adapter_name_list(adapter_names)
    _require(model, adapter_names)
    _refuse_two_copies(model, adapter_names)
    with adapter_override(_switchable(model), adapter_names):
        yield


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes exactly the base output (even while merged: the
    original weights are kept), and no weight is modified. Other models are not affected.

    Biases trained by an adapter with ``bias="all"`` / ``"lora_only"`` are the base model's own
    and stay as trained: then the output is not the original base model's (a warning says so).
    """
    warn_trained_biases(model, "lorakit.disabled")
    with adapters_off(model):
        yield


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """``disabled`` without its warning about trained biases (for callers that run before any
    training, e.g. EVA's statistics of the base model's inputs)."""
    with adapter_override(_switchable(model), ()):
        yield


def warn_trained_biases(model: nn.Module, what: str) -> None:
    """Warn that ``what`` (disabling the adapters) keeps the biases that adapters with
    ``bias != "none"`` train: they are the base model's own biases, changed in place."""
    with_bias = {n: c.bias for n, c in adapter_configs(model).items() if c.bias != "none"}
    if with_bias:
        warnings.warn(
            f"{what}: adapter(s) {with_bias} train the base model's biases in place; with the "
            "adapters disabled those trained biases stay, so the output is not the original "
            "base model's. Use bias='none' to get the base output exactly.",
            stacklevel=3,
        )


def _switchable(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that choose adapters per call (LoRA layers and saved modules),
    found in one walk that also wraps the model's gradient checkpointing (transformers'
    ``_gradient_checkpointing_func`` on the model and its layers) in ``ChoiceKeepingCheckpoint``:
    a segment recomputed by a ``backward`` after a ``use_adapters`` / ``disabled`` block runs
    under the block's choice. The wrapper is kept (it changes nothing outside such blocks)."""
    switchable = []
    for _, module in walk_modules(model):
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, ChoiceKeepingCheckpoint):
            module._gradient_checkpointing_func = ChoiceKeepingCheckpoint(checkpoint)
        if isinstance(module, (LoraLayer, ModulesToSave)):
            switchable.append(module)
    return switchable
