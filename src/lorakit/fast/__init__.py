"""The fast path for LoRA linear layers: the base matmul and every adapter in one pass.

Training (grad enabled and something to differentiate, or any call with dropout, whatever the
grad mode: ``_training``): one autograd node per layer (``FusedLoraLinear``) that keeps x once,
never a dropout copy of it, and adds the rank-r branch into the base output in place.
Inference (no autograd, no dropout): the same without a node. ``LoraLinear`` takes it where
``applies`` says so and the plain formula (``functional.lora_forward``) elsewhere: several adapters
while training, a trainable base weight, autocast, functorch transforms, ``torch.compile`` tracing
(the compiler fuses the plain path itself), hooks on the base layer, mixed or non-float dtypes,
and inside ``with lorakit.fast.plain_path():`` (for comparisons and debugging; only the calling
thread / task).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit import functional
from lorakit.fast.dora import DoraSide, FusedDoraLinear, dora_linear_inference, fused_dora_linear
from lorakit.fast.dropout import DROPOUT_LEVELS, drop_levels, drop_probability, keep_mask, new_seed
from lorakit.fast.linear import FusedLoraLinear, RankSide, linear_output, lora_linear_inference
from lorakit.fast.quantized import FusedQuantizedLoraLinear

__all__ = [
    "DoraSide",
    "FusedDoraLinear",
    "FusedLoraLinear",
    "FusedQuantizedLoraLinear",
    "RankSide",
    "applies",
    "fused_lora_linear",
    "fused_quantized_lora_linear",
    "keep_mask",
    "linear_output",
    "module_is_plain",
    "plain_path",
    "quantized_applies",
    "rank_side",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lorakit_fast_plain_path", default=False
)


@contextmanager
def plain_path() -> Iterator[None]:
    """Within the block LoRA layers compute the plain formula (``functional.lora_forward``)
    instead of the fused fast path: same values, for comparisons and debugging. Only the calling
    thread / asyncio task is affected. (Not ``lorakit.disabled(model)``, which drops the
    adapters.)"""
    token = _PLAIN_PATH.set(True)
    try:
        yield
    finally:
        _PLAIN_PATH.reset(token)


def module_is_plain(module: nn.Module) -> bool:
    """True when calling ``module`` does nothing but its own forward (no hooks anywhere)."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def rank_side(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout: float
) -> RankSide | None:
    """One adapter for the fast path: A, B, ``c = s / (1 - p)`` with p rounded to 1/65536
    (``lorakit.fast.dropout``); None when p rounds to 1."""
    levels = drop_levels(dropout)
    if levels >= DROPOUT_LEVELS:
        return None
    rank_scale = functional.rank_side_scale(scale, drop_probability(levels))
    return RankSide(lora_A, lora_B, rank_scale, levels)


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[RankSide | DoraSide],
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``W0 x + b + sum_a c_a B_a A_a (x * mask_a)`` (..., d), for a call where ``applies``
    (DoRA adapters: ``lorakit.fast.dora``)."""
    training = _training(x, bias, adapters)
    if any(isinstance(a, DoraSide) for a in adapters):
        if training:
            return fused_dora_linear(x, weight, bias, adapters[0], fan_in_fan_out)
        if not torch.is_grad_enabled():
            return dora_linear_inference(x, weight, bias, adapters, fan_in_fan_out)
        with torch.no_grad():
            return dora_linear_inference(x, weight, bias, adapters, fan_in_fan_out)
    if training:
        lora_A, lora_B, rank_scale, levels = adapters[0]
        seed = new_seed() if levels else 0
        return FusedLoraLinear.apply(
            x, weight, bias, lora_A, lora_B, rank_scale, levels, seed, fan_in_fan_out
        )
    if not torch.is_grad_enabled():  # e.g. under inference_mode: no context switch needed
        return lora_linear_inference(x, weight, bias, adapters, fan_in_fan_out)
    with torch.no_grad():
        return lora_linear_inference(x, weight, bias, adapters, fan_in_fan_out)


def fused_quantized_lora_linear(
    x: torch.Tensor, base_layer: nn.Module, adapter: RankSide
) -> torch.Tensor:
    """``base(x) + c B A (x * mask)`` (..., d) on a quantized ``base_layer``, for a training call
    where ``quantized_applies`` (``lorakit.fast.quantized``)."""
    lora_A, lora_B, rank_scale, levels = adapter
    seed = new_seed() if levels else 0
    return FusedQuantizedLoraLinear.apply(x, base_layer, lora_A, lora_B, rank_scale, levels, seed)


def quantized_applies(x: torch.Tensor, adapters: Sequence[RankSide]) -> bool:
    """True when ``fused_quantized_lora_linear`` can compute this call: training one adapter
    (``_training``: a gradient to record, or dropout; inference without dropout takes the
    plain formula, which adds in place without a graph), float x and
    adapters on one device, no autocast, transforms or compiling, not in ``plain_path``."""
    if len(adapters) != 1 or torch.compiler.is_compiling() or _PLAIN_PATH.get():
        return False
    if _transforms_active() or not _training(x, None, adapters) or x.dtype not in _FLOAT_DTYPES:
        return False
    if x.dim() == 0 or x.numel() == 0 or torch.is_autocast_enabled(x.device.type):
        return False
    lora_A, lora_B, _, _ = adapters[0]
    return all(p.device == x.device and p.dtype in _FLOAT_DTYPES for p in (lora_A, lora_B))


def _training(
    x: torch.Tensor, bias: torch.Tensor | None, adapters: Sequence[RankSide | DoraSide]
) -> bool:
    """The call takes the training computation: something records a gradient, or an adapter
    drops out. With dropout the path must not depend on the grad mode: a reentrant checkpoint
    runs the forward without autograd and recomputes it with, under the same RNG state, and
    the two must draw the same masks (the training nodes draw theirs from one seed)."""
    sides = [a.side if isinstance(a, DoraSide) else a for a in adapters]
    if any(side.drop_levels for side in sides):
        return True
    return torch.is_grad_enabled() and _any_requires_grad(x, bias, adapters)


def _any_requires_grad(
    x: torch.Tensor, bias: torch.Tensor | None, adapters: Sequence[RankSide | DoraSide]
) -> bool:
    if x.requires_grad or (bias is not None and bias.requires_grad):
        return True
    for adapter in adapters:
        if isinstance(adapter, DoraSide):
            if adapter.magnitude.requires_grad:
                return True
            adapter = adapter.side
        if adapter.lora_A.requires_grad or adapter.lora_B.requires_grad:
            return True
    return False


def applies(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[RankSide | DoraSide],
) -> bool:
    """True when ``fused_lora_linear`` can compute this call (see the module docstring)."""
    if not adapters or torch.compiler.is_compiling() or _PLAIN_PATH.get() or _transforms_active():
        return False
    training = _training(x, bias, adapters)
    if training and len(adapters) != 1:
        return False
    if not _dora_applies(x, adapters, training):
        return False
    adapters = [a.side if isinstance(a, DoraSide) else a for a in adapters]
    dtype, device = x.dtype, x.device
    if weight.requires_grad or dtype not in _FLOAT_DTYPES or weight.dtype != dtype:
        return False
    if weight.device != device or x.dim() == 0 or x.numel() == 0:
        return False
    if _autocast(device) or (bias is not None and bias.dtype != dtype):
        return False
    for lora_A, lora_B, _, _ in adapters:
        if lora_A.device != device or lora_B.device != device:
            return False
        if lora_A.dtype not in _FLOAT_DTYPES or lora_B.dtype not in _FLOAT_DTYPES:
            return False
    return True


def _autocast(device: torch.device) -> bool:
    """Autocast on for ``device`` (``meta``, where ``lorakit plan`` counts, has none)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def _dora_applies(x: torch.Tensor, adapters: Sequence, training: bool) -> bool:
    """DoRA adapters: in training (with dropout, always: ``_training``), factors and magnitude
    in x's dtype (the node computes its gradients in it)."""
    for adapter in adapters:
        if not isinstance(adapter, DoraSide):
            continue
        tensors = (adapter.side.lora_A, adapter.side.lora_B, adapter.magnitude)
        if training and any(t.dtype != x.dtype for t in tensors):
            return False
        if any(t.device != x.device for t in (*tensors, adapter.norms)):
            return False
    return True


_functorch_check = getattr(torch._C, "_are_functorch_transforms_active", None)


def _transforms_active() -> bool:
    """functorch transforms (vmap, grad, jvp) and forward-mode AD (a ``forward_ad.dual_level``
    is open) need what the fused Functions do not define (vmap rules, ``jvp``)."""
    if _functorch_check is not None and _functorch_check():
        return True
    return torch.autograd.forward_ad._current_level >= 0
