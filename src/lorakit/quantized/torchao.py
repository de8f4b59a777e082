"""torchao weight-only int8 bases: an ``nn.Linear`` whose weight is torchao's ``Int8Tensor``, as
``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())`` leaves it.

``W0[i, :] = qdata[i, :] * scale[i]`` (per-row scales, ``block_size`` (1, in)), dequantized by
the tensor's own ``dequantize()``. The forward is torchao's int8 kernel; its input gradient
``dL/dx = dL/dy W0`` dequantizes the weight again in backward, because torchao's own autograd
keeps a float32 copy of the (out, in) codes for backward (4x the int8 weight). An
``Int8Tensor`` that also quantizes activations (``act_quant_kwargs`` set, i.e. dynamic int8
activation configs) is refused: its output is not ``x W0^T``, so a float merge could not match
it. torchao's other tensor types (int4, NF4, float8) are refused by class name upstream.

A layer accelerate offloaded (``cpu_offload``; a ``device_map`` with "cpu" entries: the weight
on the meta device between calls, its value in the hook's offload map) is read from that map
(``held_weight``), and its forward loads it through the hook for the call, as calling the
module does (``base_forward``): the outputs are those of the layer not offloaded, bit for bit.
(accelerate cannot offload an ``Int8Tensor`` to "disk": it writes tensors with ``.numpy()``.)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "base_forward",
    "check",
    "dequantized_weight",
    "describe",
    "held_weight",
    "requantize",
    "shape",
    "storage",
]


def check(module: nn.Module) -> None:
    from lorakit.quantized import UnsupportedQuantizedLayerError

    weight = module.weight
    if getattr(weight, "act_quant_kwargs", None) is not None:
        raise UnsupportedQuantizedLayerError(
            "this torchao Int8Tensor also quantizes activations (a dynamic int8 activation "
            "config); lorakit supports weight-only int8 (Int8WeightOnlyConfig) only, because "
            "the layer's output is then x W0^T and a merge can match it"
        )
    block_size = list(getattr(weight, "block_size", []))
    if block_size != [1, weight.shape[1]]:
        raise UnsupportedQuantizedLayerError(
            f"this torchao Int8Tensor has block_size {block_size}; lorakit supports per-row "
            f"scales (block_size [1, {weight.shape[1]}]) only"
        )


def shape(module: nn.Module) -> tuple[int, int]:
    return module.out_features, module.in_features


def describe(module: nn.Module) -> str:
    return "torchao-int8-weight-only"


def held_weight(module: nn.Module) -> torch.Tensor:
    """The layer's ``Int8Tensor``: its ``weight``, or where accelerate offloaded it (on the meta
    device) the value its hook keeps in the offload map (``fingerprint.offloaded_weight``), on
    the hook's execution device, where the hook loads it for a call. A meta weight nothing
    holds a value of (a model built on the meta device) is returned as it is."""
    weight = module.weight
    if not weight.is_meta:
        return weight
    from lorakit.io.fingerprint import offloaded_weight
    from lorakit.layers.base import offload_hook

    value = offloaded_weight(module, "weight")
    if value is None:
        return weight
    device = offload_hook(module).execution_device
    return value if device is None else value.to(device)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``W0`` (out, in) in float32: ``qdata * scale`` (the tensor's own ``dequantize``)."""
    with torch.no_grad():
        return held_weight(module).dequantize().to(torch.float32)


class _FrozenInt8Linear(torch.autograd.Function):
    """``y = x W0^T`` by torchao's kernel; backward ``dL/dx = dL/dy dequant(W0)``, recomputed
    (nothing of the weight saved). The weight is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        with torch.no_grad():
            return torch.nn.functional.linear(x, module.weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantized_weight(ctx.module).to(grad_output.dtype)
        return grad_output @ weight, None  # (..., out) @ (out, in) -> (..., in)


def base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W0^T + b`` (the bias outside the int8 kernel, so a trained bias gets its gradient).
    A layer accelerate offloaded is loaded by its hook for the call and offloaded after it
    (``pre_forward`` / ``post_forward``, as calling the module would): the same output."""
    check(module)
    if module.weight.is_meta:
        from lorakit.layers.base import offload_hook

        hook = offload_hook(module)
        if hook is not None:
            return _offloaded_forward(module, hook, x)
    out = _FrozenInt8Linear.apply(x, module)
    return out if module.bias is None else out + module.bias.to(out.dtype)


def _offloaded_forward(module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
    """``base_forward`` with the layer's tensors loaded by its accelerate ``hook`` for the call
    and offloaded again after it (also if it raises)."""
    from lorakit.offloaded_merge import onloaded

    with onloaded([(module, hook)]):
        out = base_forward(module, x)
    hook.post_forward(module, None)
    return out


def storage(module: nn.Module) -> dict[str, torch.Tensor]:
    """``qdata`` (out, in) int8 and ``scale`` (out,) of the held ``Int8Tensor``."""
    weight = held_weight(module)
    return {"codes": weight.qdata, "row_scales": weight.scale}


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new ``nn.Linear`` (same bias, same dtype) holding ``weight`` quantized afresh with
    ``Int8WeightOnlyConfig``."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    dtype = module.weight.dtype
    new = nn.Linear(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        device=weight.device,
        dtype=dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.requires_grad_(False)
    quantize_(new, Int8WeightOnlyConfig())
    return new
