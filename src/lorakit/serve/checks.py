"""Checks on an adapter's tensors before the bank writes any of them (PEFT keys and shapes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lorakit import quantized
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io.file_tensors import unmerged_base_tensor
from lorakit.io.keys import (
    base_weight_module,
    is_magnitude_key,
    is_token_rows_key,
    lora_key_pairs,
    module_path,
    parse_lora_key,
)
from lorakit.io.tensors import TORCH_DTYPES
from lorakit.serve.stacks import LayerStack

__all__ = ["PreparedAdapter", "lora_pairs", "prepare_adapter"]


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against the bank and ready to be written into a slot: ``pairs``
    ``{layer: (A (r, k), B (d, r))}``, ``scales`` ``{layer: s}`` and, for a DoRA adapter,
    ``gains`` ``{layer: f - 1 (d,)}`` (its pairs then hold ``f B``; ``stacks.dora_slot_factors``)."""

    name: str
    config: LoraConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    gains: dict[str, torch.Tensor] = field(default_factory=dict)


def prepare_adapter(
    name: str,
    config: LoraConfig,
    tensors: Mapping[str, torch.Tensor],
    stacks: Mapping[str, LayerStack],
    max_rank: int,
) -> PreparedAdapter:
    """``lora_pairs`` and each layer's scaling (the config's ``alpha_pattern`` resolved): all
    the work of a load that needs no lock."""
    from lorakit.serve.stacks import dora_slot_factors, slot_scaling

    factors = lora_pairs(name, config, tensors, stacks, max_rank)
    scales = {layer: slot_scaling(config, layer, f[0].shape[0]) for layer, f in factors.items()}
    pairs, gains = {}, {}
    for layer, found in factors.items():
        if len(found) == 3:  # DoRA: (A, B, m)
            lora_A, lora_B, magnitude = found
            with torch.no_grad():
                scaled_B, gains[layer] = dora_slot_factors(
                    stacks[layer], lora_A, lora_B, magnitude, scales[layer], name
                )
            pairs[layer] = (lora_A, scaled_B)
        else:
            pairs[layer] = found
    return PreparedAdapter(name, config, pairs, scales, gains)


def lora_pairs(
    name: str,
    config: LoraConfig,
    tensors: Mapping[str, torch.Tensor],
    stacks: Mapping[str, LayerStack],
    max_rank: int,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{layer path: (A, B)}`` after checking every key, shape and rank (before any write);
    ``(A, B, m)`` for a DoRA adapter (``config.use_dora``: ``.lora_magnitude_vector`` keys).

    ``tensors`` may also map keys to safetensors header entries (``TensorInfo``: shape and
    dtype), to check a file before reading its data. Raises ``AdapterFileError`` naming the tensor: a key that is not a linear LoRA factor, a
    factor that is not a non-empty floating-point 2-D matrix, shapes that do not fit the layer, rank > max_rank.

    A full copy of a base weight (PEFT's ``save_embedding_layers``, "auto" by default when the
    adapter targets lm_head or embed_tokens: ``<path>.base_layer.weight``; ``keys.
    base_weight_module`` tells one) is accepted and left out when it is the served base's
    weight: by shape from a header, by value (``_same_base``) from tensors; else refused.
    """
    if config.target_parameters:
        raise AdapterFileError(
            f"adapter {name!r} adapts bare parameters (target_parameters="
            f"{config.target_parameters!r}); the serving bank adds LoRA outputs of linear "
            "layers per row and cannot serve it. Merge it into the model instead."
        )
    if config.layer_replication:
        raise AdapterFileError(
            f"adapter {name!r} adapts replicated layers (layer_replication="
            f"{config.layer_replication!r}); the served model keeps its own layers. Merge it "
            "into the model instead."
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key, embeddings=False)
        if parsed is None and config.use_dora and is_magnitude_key(key):
            parsed = module_path(key.removesuffix(".lora_magnitude_vector")), "m"
        if parsed is None:
            others.append(key)
            continue
        path, role = parsed
        parts.setdefault(path, {})[role] = tensor
    copies = _base_copies(name, config, others, tensors)
    pairs = {}
    for path, part in parts.items():
        pairs[path] = _checked_pair(name, path, part, stacks, max_rank)
        if config.use_dora:
            pairs[path] += (_checked_magnitude(name, path, part, pairs[path][1]),)
    for key, module in copies.items():
        _check_base_copy(name, key, module, tensors[key], stacks)
    if not pairs:
        raise AdapterFileError(f"adapter {name!r} holds no LoRA tensors.")
    return pairs


def _base_copies(
    name: str, config: LoraConfig, keys: list[str], tensors: Mapping[str, object]
) -> dict[str, str]:
    """``{key: module}`` of the full base weights among ``keys`` (the file's tensors that are
    not linear LoRA factors or DoRA magnitudes), by ``keys.base_weight_module`` (the rule
    ``summary`` and ``combining`` read such copies by); ``AdapterFileError`` naming the first
    other tensor (``_unservable``)."""
    adapted = set(lora_key_pairs(tensors))  # embeddings too: their base_layer copies
    copies = {}
    for key in keys:
        module = base_weight_module(key, adapted, config.modules_to_save or [])
        if module is None:
            raise AdapterFileError(_unservable(name, key))
        copies[key] = module
    return copies


def _unservable(name: str, key: str) -> str:
    """The refusal of a tensor the bank cannot serve: what it is and the way out."""
    if parse_lora_key(key) is not None:
        what = "a factor of a LoRA on an embedding layer (lora_embedding_A/B)"
    elif key.endswith(".bias"):
        what = "a bias (lora_bias, or a trained bias of the base)"
    elif is_token_rows_key(key):
        what = "embedding rows trained to new values (trainable_token_indices)"
    else:
        what = "a trained copy of a module (modules_to_save) or another non-LoRA tensor"
    return (
        f"adapter {name!r}: tensor {key!r} is not a LoRA linear weight: it is {what}. The "
        "serving bank adds the lora_A/lora_B products of linear layers (an output layer such "
        "as lm_head included) and leaves the served model's own weights as they are; merge the "
        "adapter into its base model (lorakit merge) and serve the merged model instead."
    )


def _check_base_copy(
    name: str, key: str, module: str, copy, stacks: Mapping[str, LayerStack]
) -> None:
    """A file's full copy ``copy`` (tensor or header entry) of ``module``'s base weight is the
    served weight: the same shape, floating point and, for a tensor, the same values up to the
    rounding of either dtype (``_same_base``); else ``AdapterFileError`` naming ``key``. Only
    the layers the bank routes can be checked (it holds their base modules)."""
    stack = stacks.get(module)
    if stack is None or stack.base_layer is None:
        raise AdapterFileError(
            f"adapter {name!r}: tensor {key!r} is a full copy of the base weight of {module!r} "
            "(PEFT's save_embedding_layers), a layer the serving bank does not route, so it "
            "cannot check that the served model holds that weight. Re-save the adapter with "
            "save_embedding_layers=False if it was trained on the served base, or merge it "
            "into its base model and serve that."
        )
    if quantized.is_quantized(stack.base_layer):
        raise AdapterFileError(
            f"adapter {name!r}: tensor {key!r} is a full float copy of the base weight of "
            f"{module!r} (PEFT's save_embedding_layers), which the served model holds "
            "quantized, so the bank cannot tell whether the adapter changes it. Re-save the "
            "adapter with save_embedding_layers=False if it was trained on the served base."
        )
    own = unmerged_base_tensor(stack.base_layer, "weight").detach()
    if tuple(copy.shape) != tuple(own.shape) or not _floating(copy):
        how = f"shape {list(copy.shape)} and dtype {copy.dtype}, the served one {list(own.shape)}"
    elif isinstance(copy, torch.Tensor) and not _same_base(own, copy):
        how = "other values, beyond the rounding of either dtype"
    else:
        return
    raise AdapterFileError(
        f"adapter {name!r}: tensor {key!r} is a copy of the base weight of {module!r} (PEFT's "
        f"save_embedding_layers) that differs from the served model's ({how}): the adapter "
        "changes the base weight, which the serving bank never does. Serve it merged (merge it "
        "into its base model and serve that), or re-save it with save_embedding_layers=False "
        "if it was trained on the served base."
    )


def _same_base(own: torch.Tensor, copy: torch.Tensor) -> bool:
    """``combining.compatible.same_up_to_rounding`` (the rule for saved base weights: equal once
    one is rounded to the other's dtype) of the served weight ``own`` (d, k) and a file's copy,
    compared in blocks of about 2^24 elements on ``own``'s device: an lm_head copy is
    vocabulary x hidden, and no full-size temporary is made beside it."""
    from lorakit.combining.compatible import same_up_to_rounding

    rows = max(1, _COMPARE_ELEMENTS // max(1, own[0].numel()))
    for start in range(0, own.shape[0], rows):
        block = copy[start : start + rows].to(own.device)
        if not same_up_to_rounding(own[start : start + rows], block):
            return False
    return True


_COMPARE_ELEMENTS = 2**24


def _checked_magnitude(name: str, path: str, part: dict, lora_B) -> torch.Tensor:
    """DoRA's magnitude of ``path``: present, floating point, of shape (d,)."""
    magnitude = part.get("m")
    if magnitude is None:
        raise AdapterFileError(
            f"adapter {name!r} uses DoRA but has no {path}.lora_magnitude_vector; the file is "
            "incomplete, re-save it."
        )
    if tuple(magnitude.shape) != (lora_B.shape[0],) or not _floating(magnitude):
        raise AdapterFileError(
            f"adapter {name!r}: tensor {path}.lora_magnitude_vector has shape "
            f"{tuple(magnitude.shape)} and dtype {magnitude.dtype}; DoRA's magnitude is a "
            f"floating-point vector of the {lora_B.shape[0]} output features. The file is broken."
        )
    return magnitude


def _floating(factor) -> bool:
    """A tensor's, or a safetensors header entry's (``TensorInfo``), dtype is floating point."""
    if isinstance(factor, torch.Tensor):
        return factor.is_floating_point()
    return TORCH_DTYPES[factor.dtype].is_floating_point


def _checked_pair(
    name: str,
    path: str,
    part: dict[str, torch.Tensor],
    stacks: Mapping[str, LayerStack],
    max_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    stack = stacks.get(path)
    if stack is None:
        raise AdapterFileError(
            f"adapter {name!r} adapts {path!r}, which the served model was not prepared "
            f"for (routed layers: e.g. {list(stacks)[:3]}...); restart the server with "
            "target modules that include it."
        )
    if not {"lora_A", "lora_B"} <= set(part):
        raise AdapterFileError(f"adapter {name!r}: {path!r} lacks lora_A or lora_B.")
    lora_A, lora_B = part["lora_A"], part["lora_B"]
    for role, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if len(tensor.shape) != 2 or 0 in tensor.shape:
            raise AdapterFileError(
                f"adapter {name!r}: tensor {path}.{role}.weight has shape "
                f"{tuple(tensor.shape)}; a LoRA factor is a non-empty matrix "
                "(lora_A (r, in_features), lora_B (out_features, r)). The file is broken."
            )
        if not _floating(tensor):
            raise AdapterFileError(
                f"adapter {name!r}: tensor {path}.{role}.weight has dtype {tensor.dtype}; LoRA "
                "factors are floating point. The file is broken."
            )
    rank = lora_A.shape[0]
    k, d = stack.in_features, stack.out_features
    if tuple(lora_A.shape) != (rank, k) or tuple(lora_B.shape) != (d, rank):
        raise AdapterFileError(
            f"adapter {name!r}: {path!r} has lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)}; expected ({rank}, {k}) and ({d}, {rank}) for this model."
        )
    if rank > max_rank:
        raise AdapterFileError(
            f"adapter {name!r}: {path!r} has rank {rank} > the bank's max_rank "
            f"{max_rank}; restart the server with a larger --max-rank."
        )
    return lora_A, lora_B
