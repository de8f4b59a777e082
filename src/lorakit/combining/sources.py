"""The adapters to combine, read into one shape whatever they come from, and checked together.

An adapter is a directory (PEFT's files, read with ``lorakit.io.read_adapter``) or an adapter
on a model (its LoRA layers' tensors). Either becomes an ``AdapterUpdates``: per adapted module
the factors ``A`` (r, k), ``B`` (d, r) and the scale ``s`` (from the adapter's own r, alpha,
rsLoRA and patterns, via ``functional.scaling``), so that the module's update is
``ΔW = s B A`` (d, k). Embeddings keep PEFT's factor layout (A (r, num), B (dim, r)); all
combining happens on ``B A`` in that layout, and only the file keys differ.

Only LoRA factors combine: an adapter that also trains biases, saves full modules
(``modules_to_save``) or trains embedding rows (``trainable_token_indices``) is refused. The
full base weights a file may carry (PEFT's ``save_embedding_layers``: ``<embedding>.base_layer.
weight``, ``lm_head.weight``) are not combined: equal in every input that carries one, they are
carried into the result; different, they are refused (``compatible.carried_base_weights``).
A ``<path>.base_layer.weight`` of a module the file does not adapt (PEFT's save of one adapter
of a model whose OTHER adapter wraps ``<path>``: ``stray_weights.stray_base_layer_module``) is left out
with a ``StrayBaseWeightWarning``, as PEFT's load leaves it out on a model where ``<path>`` is
not adapted. Factors that are not 2-D (PEFT's LoRA on a convolution: A (r, C, kh, kw)) are
refused: lorakit combines LoRA on linear / Conv1D / embedding layers only.
Whether the adapters are of one base model at all is ``lorakit.combining.compatible``'s to say. A PiSSA / OLoRA
adapter saved without conversion (by PEFT or lorakit) is refused, from the headers of all the
directories before any tensor is read: its ``s B A`` holds the base's principal part, not an
update of the original base (``lorakit.io.read.refuse_residual_base_factors``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit import functional
from lorakit.combining.uncombinable import (
    refuse_convolution,
    refuse_other_layouts,
    refuse_other_tensor,
    refuse_unknown_entry,
)
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, UserError

if TYPE_CHECKING:
    from lorakit.io.read import AdapterHeader

__all__ = [
    "AdapterUpdates",
    "ModuleFactors",
    "read_sources",
]


@dataclass
class ModuleFactors:
    """One module of one adapter: ``ΔW = scale * lora_B @ lora_A``."""

    lora_A: torch.Tensor  # (r, k)
    lora_B: torch.Tensor  # (d, r)
    scale: float
    is_embedding: bool

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d, k): the shape of ``B A``."""
        return self.lora_B.shape[0], self.lora_A.shape[1]

    def delta(self) -> torch.Tensor:
        """``s B A`` (d, k) in float64."""
        return functional.delta_weight(self.lora_A, self.lora_B, self.scale, dtype=torch.float64)


@dataclass
class AdapterUpdates:
    """An adapter to combine: ``label`` (its directory, or "adapter 'name' of the model") for
    messages, its config, its modules, its base fingerprint (None if it has none) and the base
    weights its file carries."""

    label: str
    config: LoraConfig
    modules: dict[str, ModuleFactors]
    fingerprint: dict[str, dict[str, object]] | None
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """module -> the full base weight the file carries for it (PEFT's ``save_embedding_layers``:
    an embedding's, e.g. a resized vocabulary); not combined, carried when all agree."""
    on_model: bool = False
    """An adapter on the model (not a directory): all of those share one base."""
    auto_mapping: dict[str, str] | None = None
    """PEFT's ``auto_mapping`` of the adapter's base class (its file's; the model's class for an
    adapter on the model), carried into a task-less result when every input agrees."""


def _from_directory(header: AdapterHeader) -> AdapterUpdates:
    """``header``: the directory's ``lorakit.io.read.AdapterHeader``, already checked."""
    from lorakit.io.keys import base_weight_module, lora_key_pairs
    from lorakit.io.read import read_adapter_data
    from lorakit.io.stray_weights import stray_base_layer_module

    adapter = read_adapter_data(header)
    adapter.require_finite()
    label, config = str(adapter.directory), adapter.config
    refuse_other_layouts(f"adapter {label}", config)
    pairs = lora_key_pairs(adapter.tensors)
    factor_keys = {key for keys in pairs.values() for key in keys.values()}
    base_weights, strays = {}, []
    for key in adapter.tensors:
        if key in factor_keys:
            continue
        module = base_weight_module(key, pairs, config.modules_to_save or [])
        if module is None and stray_base_layer_module(key, pairs) is not None:
            strays.append(key)  # another adapter's frozen base weight: left out, as PEFT does
            continue
        if module is None:
            refuse_other_tensor(label, key)
        base_weights[module] = adapter.tensors[key]
    _warn_strays(label, strays)
    modules = {
        module: _module_factors(label, config, module, adapter.tensors, keys)
        for module, keys in pairs.items()
    }
    mapping = json.loads(header.config_text).get("auto_mapping")  # (PEFT's base class)
    mapping = mapping if isinstance(mapping, dict) else None
    return AdapterUpdates(
        label, config, modules, adapter.fingerprint, base_weights, auto_mapping=mapping
    )


def _warn_strays(label: str, keys: list[str]) -> None:
    """A ``StrayBaseWeightWarning`` naming ``keys`` (``<path>.base_layer.weight`` of modules
    the file does not adapt), which combining leaves out, at the caller's line (stacklevel 5:
    ``_warn_strays`` <- ``_from_directory`` <- ``read_sources`` <- ``combine`` <- the caller)."""
    from lorakit.io.stray_weights import StrayBaseWeightWarning, stray_base_weight_message

    if keys:
        what = "combining leaves it out, as PEFT's load does on a model that does not adapt it"
        message = stray_base_weight_message(f"adapter {label}", keys, what)
        warnings.warn(message, StrayBaseWeightWarning, stacklevel=5)


def _module_factors(
    label: str, config: LoraConfig, module: str, tensors: dict[str, torch.Tensor], keys
) -> ModuleFactors:
    """The factors of ``module`` from the file's ``tensors``; ``keys``: ``{"lora_A": key,
    "lora_B": key}`` (``lora_key_pairs``). ``UserError`` for factors that are not 2-D
    (``refuse_convolution``), ``AdapterFileError`` for a broken pair."""
    pair = {role: tensors[key] for role, key in keys.items()}
    refuse_convolution(label, module, pair)
    if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].shape[0] != pair["lora_B"].shape[1]:
        raise AdapterFileError(
            f"adapter {label}: module {module} lacks one of its factors A, B or their "
            "ranks differ; the file is broken, re-save the adapter."
        )
    rank = config.rank_for(module)
    if pair["lora_A"].shape[0] != rank:
        raise AdapterFileError(
            f"adapter {label}: module {module} has rank {pair['lora_A'].shape[0]} in the "
            f"weights but {rank} in adapter_config.json; fix the config or re-save it."
        )
    scale = functional.scaling(rank, config.alpha_for(module), config.use_rslora)
    is_embedding = "lora_embedding_" in keys["lora_A"]
    return ModuleFactors(pair["lora_A"], pair["lora_B"], scale, is_embedding)


def _from_model(model: nn.Module, adapter_name: str) -> AdapterUpdates:
    from lorakit.io import fingerprint
    from lorakit.layers import LoraEmbedding
    from lorakit.state import adapter_configs, lora_layers, saved_modules

    config = adapter_configs(model)[adapter_name]
    label = f"adapter {adapter_name!r} of the model"
    refuse_other_layouts(label, config)
    if config.trainable_token_indices:
        raise UserError(
            f"trainable_token_indices cannot be combined: {label} trains embedding rows to new "
            f"values (trainable_token_indices={config.trainable_token_indices!r}), not a "
            "low-rank update that sums with others. Combine adapters trained without them."
        )
    saved = [name for name, w in saved_modules(model) if adapter_name in w.modules_to_save]
    biases = _trained_bias_keys(model, adapter_name)
    if biases:
        raise UserError(
            f"{label} trains biases (bias={config.bias!r}, lora_bias={config.lora_bias}: "
            f"{biases[0]}); only LoRA factors can be combined: combine adapters trained with "
            "bias='none' and lora_bias=False."
        )
    if saved:
        raise UserError(
            f"{label} saves full modules ({saved}, modules_to_save), which are trained copies, "
            "not low-rank updates; only LoRA factors can be combined: combine adapters "
            "trained without modules_to_save."
        )
    modules = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.ranks:
            lora_A, lora_B = (p.detach() for p in layer.adapter_parameters(adapter_name))
            scale = layer.scalings[adapter_name]
            modules[name] = ModuleFactors(lora_A, lora_B, scale, isinstance(layer, LoraEmbedding))
    mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return AdapterUpdates(
        label,
        config,
        modules,
        fingerprint.compute(model, list(modules)),
        on_model=True,
        auto_mapping=mapping,
    )


def _trained_bias_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """The file keys of the biases ``adapter_name`` trains (``bias`` "all" / "lora_only",
    ``lora_bias``), as a save would write them: the tensors ``_from_directory`` refuses, so an
    adapter is judged alike on the model and saved (``bias="all"`` on a model without biases
    trains none)."""
    from lorakit.io.save import adapter_file_entries

    entries, _ = adapter_file_entries(model, adapter_name, [])
    return [entry.key for entry in entries if entry.role in ("bias", "lora_bias")]


def read_sources(
    adapters: Sequence[str | os.PathLike[str]], model: nn.Module | None = None
) -> list[AdapterUpdates]:
    """Each entry: the name of an adapter on ``model`` (when given and it has one of that
    name), else an adapter directory, read as its writer's peft meant it (``io.older_peft_files.
    read_as_written``). Raises ``UserError`` / ``AdapterFileError``; every directory's config
    and header are read and checked before any tensor data."""
    from lorakit.io.older_peft_files import read_as_written
    from lorakit.io.read import read_adapter_header
    from lorakit.io.residual_base import refuse_residual_base_factors
    from lorakit.state import adapter_configs

    on_model = adapter_configs(model) if model is not None else {}
    headers = {}  # position -> header, for the directory entries
    for index, entry in enumerate(adapters):
        if not (isinstance(entry, str) and entry in on_model):
            if model is not None and isinstance(entry, str) and not os.path.exists(entry):
                refuse_unknown_entry(entry, on_model)
            headers[index] = read_as_written(read_adapter_header(entry), model)
            refuse_residual_base_factors(headers[index], "combining its s B A as a weight update")
    sources = []  # (a loop, not a comprehension: _from_directory's warnings count frames)
    for index, entry in enumerate(adapters):
        if index in headers:
            sources.append(_from_directory(headers[index]))
        else:
            sources.append(_from_model(model, entry))
    return sources
