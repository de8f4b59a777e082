"""The honest merge of LoRA into a quantized base: a float weight, and re-quantizing only on request.

``merged_weight``: ``W = dequant(W0) + sum_a s_a B_a A_a``, all in float32 (the deltas come from
``lorakit.functional.delta_weight``). Put in a plain ``nn.Linear`` (``float_linear``), it gives
the unmerged quantized model's output up to float rounding: nothing is quantized again.

``requantize``: the same ``W`` stored in the base's quantized format again (what PEFT's
``merge_and_unload`` does silently on a 4-bit base). Quantizing ``W`` afresh moves most weights
to another code, so the merged layer no longer computes ``dequant(W0) x + s B A x``; the report
says by how much, on probe inputs: ``||q(x) - (x W^T + b)|| / ||x W^T + b||`` (Frobenius norms).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import functional, quantized

__all__ = ["RequantizeReport", "float_linear", "lora_delta", "merged_weight", "requantize"]


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``s * B A`` (out, in) in float32, from A (r, in) and B (out, r)."""
    return functional.delta_weight(lora_A.detach(), lora_B.detach(), scale)


def merged_weight(base: nn.Module, deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """``dequant(W0) + sum(deltas)`` in float32, shape (out, in); ValueError naming the base's
    format if the result holds inf/NaN (nothing is changed either way)."""
    weight = quantized.dequantized_weight(base)
    for delta in deltas:
        weight = weight + delta.to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"merging into the {quantized.describe(base)} base would give non-finite weights "
            "(the adapter holds inf/NaN); nothing was changed"
        )
    return weight


def _base_bias(base: nn.Module) -> torch.Tensor | None:
    bias = getattr(base, "bias", None)
    return None if bias is None else bias.detach()


def float_linear(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A plain frozen ``nn.Linear`` in ``dtype`` with ``weight`` (out, in) and ``base``'s bias."""
    out_features, in_features = weight.shape
    bias = _base_bias(base)
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


@dataclass(frozen=True)
class RequantizeReport:
    """A re-quantized layer and what re-quantizing cost, measured on probe inputs.

    ``relative_output_error``: ``||q(x) - (x W^T + b)|| / ||x W^T + b||``, the error added on top
    of the float merge; ``relative_weight_error``: ``||dequant(q) - W|| / ||W||``; ``format``:
    the storage format (``lorakit.quantized.describe``).
    """

    module: nn.Module
    format: str
    relative_output_error: float
    relative_weight_error: float


def _probe(in_features: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(64, in_features, generator=generator).to(device)


def requantize(
    base: nn.Module, weight: torch.Tensor, probe: torch.Tensor | None = None
) -> RequantizeReport:
    """Store ``weight`` (out, in; e.g. from ``merged_weight``) in ``base``'s quantized format as a
    new module (``base`` is not changed) and measure the error that adds, on ``probe`` inputs
    (..., in) (default: 64 seeded standard-normal rows)."""
    backend = quantized.backend_for(base)
    if backend is None:
        raise quantized.UnsupportedQuantizedLayerError(
            f"{type(base).__name__} is not a quantized layer; there is nothing to re-quantize to"
        )
    expected = tuple(quantized.shape(base))
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"requantize: the weight is {tuple(weight.shape)} but the {quantized.describe(base)} "
            f"base is {expected} (out, in); pass the layer's own merged weight "
            "(merged_weight(base, ...))."
        )
    new = backend.requantize(base, weight)
    if probe is None:
        probe = _probe(weight.shape[1], weight.device)
    with torch.no_grad():
        bias = _base_bias(base)
        wanted = F.linear(probe.to(torch.float32), weight, None if bias is None else bias.float())
        got = quantized.base_forward(new, probe.to(torch.float32)).to(torch.float32)
        output_error = (got - wanted).norm() / wanted.norm()
        weight_error = (quantized.dequantized_weight(new) - weight).norm() / weight.norm()
    return RequantizeReport(new, quantized.describe(new), float(output_error), float(weight_error))
