"""What lorakit's own weight-only formats share (``int8_rows``, ``int4_groups``).

``WeightOnlyLinear``: a frozen linear layer ``y = x W0^T + b`` whose forward runs its format's
kernel (``matmul(x)``) and whose backward, for an adapter trained on it, recomputes
``dL/dx = dL/dy W0`` from ``dequantized()`` (nothing saved). ``replace_linears``: swap a model's
``nn.Linear`` layers for such layers, in place, leaving in float those the model's class keeps
in float (``kept_in_float``: T5's ``wo``, whose forward reads ``wo.weight.dtype``, as
transformers leaves them unquantized for bitsandbytes).

Casting a model (``.float()``, ``.half()``, ``.to(dtype)``) casts the bias only: the stored
buffers (codes, bfloat16 scales) keep their dtypes, which the kernels require, and move with
the model to another device (``WeightOnlyLinear._apply``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

import torch
from torch import nn

__all__ = ["WeightOnlyLinear", "kept_in_float", "replace_linears"]


class WeightOnlyLinear(nn.Module):
    """Subclasses store the weight and define ``matmul(x)`` (``x W0^T`` (..., out) in ``x``'s
    dtype) and ``dequantized()`` (``W0`` (out, in) in float32); ``bias`` (out,) or None."""

    bias: nn.Parameter | None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to``, ``.float()``, ``.half()``, ``.cuda()``), except
        that a stored buffer keeps its dtype: where ``fn`` would change it (a cast), the
        original buffer is kept, moved only to the device ``fn`` chose. Lossless (no round
        trip through the new dtype) and paid once per cast, not per forward."""
        stored = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            out = _FrozenMatmul.apply(x, self)
        else:  # (an autograd Function costs more than the kernel at one token)
            out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class _FrozenMatmul(torch.autograd.Function):
    """``module.matmul(x)`` with ``dL/dx = dL/dy W0`` recomputed (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: WeightOnlyLinear) -> torch.Tensor:
        ctx.module = module
        return module.matmul(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.module.dequantized().to(grad_output.dtype)  # (n, k)
        return grad_output @ weight, None


def replace_linears(
    model: nn.Module,
    convert: Callable[[nn.Linear], nn.Module | None],
    keep: Collection[nn.Module] | None = None,
) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` (exact type) but those in ``keep``
    (None: ``kept_in_float(model)``) by ``convert(linear)`` where that is not None; returns how
    many were replaced."""
    kept = set(kept_in_float(model) if keep is None else keep)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m not in kept]
    replaced = 0
    for name, module in targets:
        new = convert(module)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            replaced += 1
    return replaced


def kept_in_float(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers (exact type) of ``model`` that its class keeps in float: named by
    ``_keep_in_fp32_modules`` (T5's ``["wo"]``) or ``_keep_in_fp32_modules_strict`` (an
    instance's lists gather its submodels'). transformers leaves the first list's layers
    unquantized for bitsandbytes (``HfQuantizer.get_modules_to_not_convert``); the strict list
    names what it keeps in float32 at every dtype, so it is kept too. A pattern matches a
    layer's full name as transformers' ``should_convert_module`` does: as a regex from the
    start up to a module boundary, or as its end; one naming a parameter (``"gate.weight"``)
    keeps the layer holding it."""
    patterns = sorted(
        {
            *(getattr(model, "_keep_in_fp32_modules", None) or ()),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
        }
    )
    if not patterns:
        return []
    return [
        module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and any(_names(pattern, name) or _names(pattern, f"{name}.weight") for pattern in patterns)
    ]


def _names(pattern: str, full_name: str) -> bool:
    """Whether ``pattern`` names ``full_name`` by transformers 5's ``should_convert_module``
    rule ("layer.1" names "layer.1.attn", not "layer.11.attn"; "fc1" names "...23.fc1")."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return bool(re.match(rf"(?:{pattern}){boundary}", full_name)) or full_name.endswith(pattern)
