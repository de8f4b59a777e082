"""The layout of an adapter file: every tensor it holds (``FileTensor``), in PEFT's names.

``adapter_file_tensors`` lists them for a model and its adapter settings (before or after
injection), ``expected_shape`` says the shape each must have, ``model_tensor`` finds the
model's tensor behind each (the unmerged base tensor for base weights and biases:
``unmerged_base_tensor``). The key names themselves are ``lorakit.io.keys``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.io.keys import (
    adapted_base_key,
    base_weight_key,
    lora_bias_key,
    lora_keys,
    magnitude_key,
    plain_key,
)
from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSave, linear_shape
from lorakit.layers.parameter import parameter_layout
from lorakit.layers.tokens import DELTA_KEY
from lorakit.targets import model_modules

__all__ = [
    "FileTensor",
    "adapter_file_tensors",
    "expected_shape",
    "model_tensor",
    "unmerged_base_tensor",
]


@dataclass(frozen=True)
class FileTensor:
    """One tensor of an adapter file: its file key, the ORIGINAL module path it belongs to and
    its role: "lora_A" / "lora_B" (for a bare parameter, ``parameter`` is its path and
    ``module`` the path of its LoRA layer), "magnitude" (DoRA's m), "lora_bias" (the bias on B),
    "tokens" (trained embedding rows, ``parameter`` is their count),
    "bias" (a base bias trained by
    ``bias`` mode), "saved" (a ``modules_to_save`` tensor; ``parameter`` is its state-dict key)
    or "base_weight" (the base weight of an input/output embedding, only when the vocabulary was
    resized)."""

    key: str
    module: str
    role: str
    parameter: str = ""


def adapter_file_tensors(
    model: nn.Module,
    bias: str,
    lora_modules: Sequence[str],
    saved_modules: Sequence[str],
    embedding_modules: Sequence[str] = (),
    modules: dict[str, nn.Module] | None = None,
    use_dora: bool = False,
    lora_bias: bool = False,
    token_modules: Mapping[str, int] | None = None,
    parameter_layers: Mapping[str, str] | None = None,
) -> list[FileTensor]:
    """Every tensor an adapter file holds, in PEFT's names.

    ``lora_modules``: modules with LoRA tensors; ``saved_modules``: modules saved in full;
    ``embedding_modules``: embeddings whose base weight is saved (resized vocabulary).
    Works before injection (on the plain model) and after (names are original names).
    ``modules``: ``dict(model_modules(model))`` when the caller has it. ``use_dora``: each
    LoRA module also has a DoRA magnitude vector; ``lora_bias``: a bias on B;
    ``token_modules``: ``{embedding: number of trained rows}`` (``trainable_token_indices``);
    ``parameter_layers``: ``{LoRA layer path: parameter path}`` (``target_parameters``).
    """
    modules = dict(model_modules(model)) if modules is None else modules
    lora_set, saved_prefixes = set(lora_modules), tuple(f"{m}." for m in saved_modules)
    tensors: list[FileTensor] = []
    for name in lora_modules:
        key_A, key_B = lora_keys(name, isinstance(modules[name], nn.Embedding))
        tensors += [FileTensor(key_A, name, "lora_A"), FileTensor(key_B, name, "lora_B")]
        if use_dora:
            tensors.append(FileTensor(magnitude_key(name), name, "magnitude"))
        if lora_bias:
            tensors.append(FileTensor(lora_bias_key(name), name, "lora_bias"))
    for layer_path, parameter_path in (parameter_layers or {}).items():
        key_A, key_B = lora_keys(layer_path, False)
        tensors += [
            FileTensor(key_A, layer_path, "lora_A", parameter_path),
            FileTensor(key_B, layer_path, "lora_B", parameter_path),
        ]
    for name, module in modules.items():
        if bias == "none" or name in saved_modules or name.startswith(saved_prefixes):
            continue
        if not isinstance(getattr(module, "bias", None), nn.Parameter):
            continue
        if name in lora_set:
            tensors.append(FileTensor(adapted_base_key(name, "bias"), name, "bias", "bias"))
        elif bias == "all":
            tensors.append(FileTensor(plain_key(f"{name}.bias"), name, "bias", "bias"))
    for name in saved_modules:
        for parameter in modules[name].state_dict():
            tensors.append(FileTensor(plain_key(f"{name}.{parameter}"), name, "saved", parameter))
    for name, count in (token_modules or {}).items():
        tensors.append(FileTensor(plain_key(f"{name}.{DELTA_KEY}"), name, "tokens", str(count)))
    for name in embedding_modules:
        if name in saved_modules or name.startswith(saved_prefixes):
            continue  # its key is the saved copy's (the trained weight), not the base weight's
        key = base_weight_key(name, name in lora_set, name in (token_modules or {}))
        tensors.append(FileTensor(key, name, "base_weight", "weight"))
    return tensors


def expected_shape(modules: dict[str, nn.Module], entry: FileTensor, rank: int) -> tuple[int, ...]:
    """The shape ``entry`` must have; ``modules`` is ``dict(model_modules(model))`` (original
    modules, before or after injection) and ``rank`` the adapter's rank for ``entry.module``."""
    if entry.role in ("lora_A", "lora_B") and entry.parameter:  # a bare parameter
        owner, _, name = entry.parameter.rpartition(".")
        transposed = bool(getattr(modules[owner], "is_transposed", False))
        experts, out_features, in_features = parameter_layout(
            getattr(modules[owner], name), transposed
        )
        rows = rank * max(1, experts)
        return (rows, in_features) if entry.role == "lora_A" else (out_features, rows)
    module = modules[entry.module]
    if entry.role in ("lora_A", "lora_B"):
        if isinstance(module, nn.Embedding):
            num, dim = module.num_embeddings, module.embedding_dim
            return (rank, num) if entry.role == "lora_A" else (dim, rank)
        out_features, in_features = linear_shape(module)
        return (rank, in_features) if entry.role == "lora_A" else (out_features, rank)
    if entry.role == "saved":
        return tuple(module.state_dict()[entry.parameter].shape)
    if entry.role in ("magnitude", "lora_bias"):
        return (linear_shape(module)[0],)
    if entry.role == "tokens":
        return (int(entry.parameter), module.embedding_dim)
    return tuple(getattr(module, entry.parameter).shape)


def model_tensor(model: nn.Module, entry: FileTensor, adapter_name: str) -> torch.Tensor:
    """The model's tensor behind ``entry`` for adapter ``adapter_name`` (after injection)."""
    module = model.get_submodule(entry.module)
    if entry.role in ("lora_A", "lora_B"):
        if isinstance(module, LoraEmbedding):
            table = module.lora_embedding_A if entry.role == "lora_A" else module.lora_embedding_B
            return table[adapter_name]
        return getattr(module, entry.role)[adapter_name].weight
    if entry.role == "saved":
        return module.modules_to_save[adapter_name].state_dict(keep_vars=True)[entry.parameter]
    if entry.role == "magnitude":
        return module.lora_magnitude_vector[adapter_name].weight
    if entry.role == "lora_bias":
        return module.lora_B[adapter_name].bias
    if entry.role == "tokens":
        return module.modules_to_save[adapter_name].values
    return unmerged_base_tensor(module, entry.parameter)


def unmerged_base_tensor(module: nn.Module, parameter: str) -> torch.Tensor:
    """The base tensor ``parameter`` ("weight", "bias") of ``module`` (a LoRA layer, nested ones
    included, a saved-module wrapper or a plain module) WITHOUT any merged adapter: the original
    Parameter a merged LoRA layer keeps aside (``original_weight``, ``original_bias``), which is
    the live one when nothing is merged. A file therefore holds the same base tensors whether
    the model was merged or not, and a load writes into the tensor merging starts from."""
    while isinstance(module, LoraLayer):
        layer_parameter = getattr(module, "parameter_name", "weight")  # LoraParameter: its own
        if parameter == layer_parameter and module.original_weight is not None:
            return module.original_weight
        if parameter == "bias" and hasattr(module, "original_bias"):
            return module.original_bias  # a bias on B merged into it: the one kept aside
        module = module.base_layer
    if isinstance(module, ModulesToSave):
        module = module.original_module
    return getattr(module, parameter)
