"""Checks on an adapter's tensors before the bank writes any of them (PEFT keys and shapes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io.keys import is_magnitude_key, module_path, parse_lora_key
from lorakit.io.tensors import TORCH_DTYPES

if TYPE_CHECKING:
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
                    stacks[layer], lora_A, lora_B, magnitude, scales[layer]
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
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key, embeddings=False)
        if parsed is None and config.use_dora and is_magnitude_key(key):
            parsed = module_path(key.removesuffix(".lora_magnitude_vector")), "m"
        if parsed is None:
            raise AdapterFileError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA linear weight; the serving "
                "bank supports lora_A/lora_B of linear layers only (no embeddings, biases, "
                "modules_to_save)."
            )
        path, role = parsed
        parts.setdefault(path, {})[role] = tensor
    pairs = {}
    for path, part in parts.items():
        pairs[path] = _checked_pair(name, path, part, stacks, max_rank)
        if config.use_dora:
            pairs[path] += (_checked_magnitude(name, path, part, pairs[path][1]),)
    if not pairs:
        raise AdapterFileError(f"adapter {name!r} holds no LoRA tensors.")
    return pairs


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
