"""The per-layer tensors of the adapter bank, and the model side of serving.

For every adapted linear layer (d x k) the bank keeps (punica's layout, B transposed)::

    A_stack: (slots, r_max, k)    B_stack^T: (slots, r_max, d)    scaling: (slots,)

An adapter of rank r <= r_max occupies one slot: its A in rows [0, r) of ``A_stack[slot]``, its
B^T in rows [0, r) of ``B_stack^T[slot]``, zeros elsewhere; zero padding adds exactly nothing, so
adapters of different ranks and alphas (and ``rank_pattern`` / ``alpha_pattern`` / rsLoRA) share
one stack. A layer the adapter does not target is all zeros in that slot.

A DoRA adapter (``lorakit.functional``) is a LoRA adapter with ``f B`` in its B slot plus a gain
``f - 1`` (d,) on its rows' base output, bias excluded (``dora_gain``, allocated at the first
DoRA adapter; not counted in ``slot_bytes``): ``y = base + (f - 1) (W0 x) + s (f B) A x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit import functional, quantized
from lorakit.config import LoraConfig
from lorakit.inject import wrap_targets
from lorakit.layers import LoraLinear, is_conv1d
from lorakit.state import lora_layers
from lorakit.targets import find_targets, no_match_message

__all__ = [
    "LayerStack",
    "allocate_stack",
    "dora_slot_factors",
    "prepare_for_serving",
    "slot_bytes",
    "slot_scaling",
    "write_slot",
]


@dataclass
class LayerStack:
    """The stacked adapters of one linear layer. ``present``: slots with an adapter here.

    B is held transposed, ``lora_B_t`` (slots, r_max, d), so that the batched product
    ``low (S, L, r) @ B^T (S, r, d)`` reads contiguous rows (about 1.6x faster on CPU than a
    transposed view); ``lora_B`` is the (slots, d, r_max) view of the same memory.
    """

    name: str
    lora_A: torch.Tensor  # (slots, r_max, k)
    lora_B_t: torch.Tensor  # (slots, r_max, d)
    scaling: torch.Tensor  # (slots,) float32
    present: set[int] = field(default_factory=set)
    scaling_values: dict[int, float] = field(default_factory=dict)  # the same, as Python floats
    base_layer: nn.Module | None = None  # the served layer's base (DoRA's row norms read W0)
    dora_gain: torch.Tensor | None = None  # (slots + 1, d) float32: f - 1; row ``slots``: 0
    dora_slots: set[int] = field(default_factory=set)

    @property
    def lora_B(self) -> torch.Tensor:
        """B of every slot, (slots, d, r_max): a view of ``lora_B_t`` (writes go through)."""
        return self.lora_B_t.transpose(1, 2)


def prepare_for_serving(model: nn.Module, target_modules: str | list[str] = "all-linear") -> int:
    """Wrap the ``target_modules`` of ``model`` in LoRA layers with no adapter (in place).

    The layers compute exactly the base output until a bank routes rows to adapters. Returns the
    number of LoRA layers the model now has. Targets are found by PEFT's matching rules
    (``find_targets``) and wrapped by the code ``inject`` uses (``wrap_targets``).
    """
    config = LoraConfig(r=1, lora_alpha=1, target_modules=target_modules)
    # not strict: the union of the adapters' lists may name modules this model lacks
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(no_match_message(model, config))
    wrap_targets(model, targets)
    model.requires_grad_(False)
    return sum(1 for _ in lora_layers(model))


def slot_bytes(layer: LoraLinear, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes one slot takes in ``layer``'s stacks: A and B padded to ``max_rank``, plus a
    float32 scaling."""
    item = torch.empty((), dtype=dtype).element_size()
    return max_rank * (layer.in_features + layer.out_features) * item + 4


def allocate_stack(
    name: str, layer: LoraLinear, slots: int, max_rank: int, dtype: torch.dtype
) -> LayerStack:
    """Zeroed stacks of ``slots`` adapters of rank <= ``max_rank`` for ``layer``."""
    d, k, device = layer.out_features, layer.in_features, layer.base_device
    return LayerStack(
        name=name,
        lora_A=torch.zeros(slots, max_rank, k, dtype=dtype, device=device),
        lora_B_t=torch.zeros(slots, max_rank, d, dtype=dtype, device=device),
        scaling=torch.zeros(slots, dtype=torch.float32, device=device),
        base_layer=layer.base_layer,
    )


def slot_scaling(config: LoraConfig, layer_name: str, rank: int) -> float:
    """The scaling ``s`` of an adapter with ``config`` and rank ``rank`` at ``layer_name``
    (``alpha_pattern`` and rsLoRA applied). Matches the config's regexes: call it outside any
    lock the server needs (the patterns are bounded, ``lorakit.patterns``, but not free)."""
    return functional.scaling(rank, config.alpha_for(layer_name), config.use_rslora)


def dora_slot_factors(
    stack: LayerStack,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f B (d, r), f - 1 (d,))`` of a DoRA adapter on ``stack``'s layer, with
    ``f = m / ||W0 + s B A||_row`` (``functional.dora_row_norms``, W0 of the served model;
    a quantized W0 is dequantized for this, as the merge does)."""
    base = stack.base_layer
    if quantized.is_quantized(base):  # W0 = dequant(packed), float32 (d, k); not kept
        weight, fan_in_fan_out = quantized.dequantized_weight(base), False
    else:
        weight, fan_in_fan_out = base.weight, is_conv1d(base)
    dtype = functional.norm_dtype(weight, lora_A, lora_B)
    base_sq = functional.base_row_sq_norms(weight, fan_in_fan_out, dtype)
    norms = functional.dora_row_norms(base_sq, weight, lora_A, lora_B, scale, fan_in_fan_out)
    factor = functional.dora_factor(magnitude.to(norms.device, dtype), norms)  # (d,)
    scaled_B = (lora_B.to(norms.device, dtype) * factor[:, None]).to(lora_B.dtype)
    return scaled_B, (factor - 1.0).float()


def _write_gain(stack: LayerStack, slot: int, gain: torch.Tensor | None) -> None:
    """``dora_gain[slot] = gain`` (None: a LoRA adapter or none, zeros)."""
    if gain is None:
        if stack.dora_gain is not None:
            stack.dora_gain[slot].zero_()
        stack.dora_slots.discard(slot)
        return
    if stack.dora_gain is None:
        slots, d = stack.lora_A.shape[0], stack.lora_B_t.shape[2]
        stack.dora_gain = torch.zeros(slots + 1, d, device=stack.lora_A.device)
    stack.dora_gain[slot].copy_(gain)
    stack.dora_slots.add(slot)


def write_slot(
    stack: LayerStack,
    slot: int,
    pair: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float = 0.0,
    gain: torch.Tensor | None = None,
) -> None:
    """Put ``pair = (A (r, k), B (d, r))`` with scaling ``scale`` (``slot_scaling``) into
    ``slot`` (zeros beyond rank r; ``pair`` None: the adapter does not adapt this layer, all
    zeros). ``gain``: a DoRA adapter's ``f - 1`` (d,), with ``pair = (A, f B)``
    (``dora_slot_factors``)."""
    _write_gain(stack, slot, gain if pair is not None else None)
    stack.lora_A[slot].zero_()
    stack.lora_B_t[slot].zero_()
    if pair is None:
        stack.scaling[slot] = 0.0
        stack.present.discard(slot)
        return
    lora_A, lora_B = pair
    rank = lora_A.shape[0]
    stack.lora_A[slot, :rank].copy_(lora_A)
    stack.lora_B_t[slot, :rank].copy_(lora_B.T)
    stack.scaling[slot] = scale
    stack.scaling_values[slot] = scale
    stack.present.add(slot)
