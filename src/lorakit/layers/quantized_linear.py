"""``QuantizedLoraLinear``: LoRA beside a quantized frozen linear base (QLoRA).

``h = base(x) + sum_a s_a B_a A_a dropout(x)``, where ``base(x)`` is the quantized layer's own
kernel (``lorakit.quantized.base_forward``) and A (r, k), B (d, r) are float tensors (float32 by
default) with PEFT's keys, exactly as for ``LoraLinear``. The quantized storage is never written:

- merging computes ``W = dequant(W0) + sum_a s_a B_a A_a`` in float32
  (``lorakit.quantized.merge.merged_weight``) and keeps it BESIDE the untouched base (one float
  (d, k) matrix per merged layer, while merged); the merged forward is ``x W^T + b``;
- unmerging drops that matrix: the quantized bytes are bit-identical after any number of cycles;
- ``merge_and_unload`` replaces the layer by a plain float ``nn.Linear`` holding ``W``.

Training one adapter takes the fused node of ``lorakit.fast.quantized`` (the base by its own
kernel, its input gradient from a dequantized weight that lives only for that product; x kept
once, the dropout mask as bits); elsewhere the plain formula runs. Neither keeps a dequantized
copy of the weight for backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import fast, quantized
from lorakit.layers.linear import LoraLinear
from lorakit.layers.merging import MergeState
from lorakit.quantized.merge import float_linear, merged_weight

__all__ = ["QuantizedLoraLinear"]


class QuantizedLoraLinear(LoraLinear):
    """LoRA for a quantized linear base (``lorakit.quantized``: bitsandbytes 4-bit / 8-bit,
    torchao weight-only int8, GGUF blocks). Shapes as ``LoraLinear``: x (..., k) -> (..., d).

    ``base_format``: the storage format (``"bnb-nf4-dq"``, ``"gguf-Q4_1"``, ...). DoRA is not
    implemented on a quantized base yet (its row norms read W0): ``use_dora=True`` is refused,
    and so is ``lora_bias=True`` (merging would drop its ``s b``).
    """

    supports_dora = False
    supports_lora_bias = False  # (its merge would have to add s b beside the quantized base)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = quantized.shape(base_layer)
        self.base_format = quantized.describe(base_layer)

    # ----------------------------------------------------------------- the base
    @property
    def base_device(self) -> torch.device:
        return next(iter(quantized.storage(self.base_layer).values())).device

    @property
    def base_float_dtype(self) -> torch.dtype:
        """Float32: the dtype the adapter and a merged weight take on a quantized base."""
        return torch.float32

    def read_merge_state(self) -> tuple[MergeState, torch.Tensor | None]:
        """``(state, None)``: ``None`` stands for the quantized base itself (never replaced)."""
        return self._merge_state, None

    def base_output(
        self, weight: torch.Tensor | None, x: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        """The quantized base's own output (``weight`` None), or ``x W^T + b`` with the merged
        float ``weight``."""
        if weight is None:
            if args or kwargs:
                return self.base_layer(x, *args, **kwargs)
            return quantized.base_forward(self.base_layer, x)
        return self.base_forward_with_weight(weight, x)

    def calls_base_module(self, weight: torch.Tensor | None, *args, **kwargs) -> bool:
        """The unmerged base runs its own module (some backends call it even without extra
        arguments): its output is not ours to change in place when it has hooks."""
        plain = not (args or kwargs) and fast.module_is_plain(self.base_layer)
        return weight is None and not plain

    def routed_base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Serving: the quantized base's own kernel, exactly as the unmerged forward runs it."""
        return self.base_output(None, x, *args, **kwargs)

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def base_is_plain(self) -> bool:
        return False

    def fast_adapters(
        self, x: torch.Tensor, weight: torch.Tensor | None, adapters: Sequence[str]
    ) -> list[fast.RankSide] | None:
        """The one training adapter for the fused node (``lorakit.fast.quantized``), or None
        for the plain formula: several adapters, a bias on B, a trainable base bias, hooks on
        the base layer, inference without dropout (see ``fast.quantized_applies``)."""
        dropping = self.training and any(self.dropouts[name] for name in adapters)
        if not (torch.is_grad_enabled() or dropping):  # inference: the plain formula, at once
            return None
        bias = getattr(self.base_layer, "bias", None)
        if not fast.module_is_plain(self.base_layer) or (bias is not None and bias.requires_grad):
            return None
        if any(self.lora_bias_of(name) is not None for name in adapters):
            return None
        sides = []
        for name in adapters:
            dropout = self.dropouts[name] if self.training else 0.0
            side = fast.rank_side(
                self.lora_A[name].weight, self.lora_B[name].weight, self.scalings[name], dropout
            )
            if side is None:
                return None
            sides.append(side)
        return sides if fast.quantized_applies(x, sides) else None

    def fast_output(
        self, x: torch.Tensor, weight: torch.Tensor | None, fast_adapters: list
    ) -> torch.Tensor:
        return fast.fused_quantized_lora_linear(x, self.base_layer, fast_adapters[0])

    # ----------------------------------------------------------------- merge
    @property
    def original_weight(self) -> None:
        """None: a quantized base has no float weight (see ``lorakit.quantized``)."""
        return None

    def prepare_merge(
        self, adapter_names: Sequence[str], dtype: torch.dtype | None = None
    ) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """``(names, W)`` with ``W = dequant(W0) + sum_a s_a B_a A_a`` (float32, (d, k)) over the
        merged and the named adapters; None if all are merged. Changes nothing. (``dtype``: as
        for a float layer; the float32 W is cast by ``merge_and_unload``'s dequantizing.)"""
        to_merge = tuple(dict.fromkeys(n for n in adapter_names if n not in self.merged_adapters))
        if not to_merge:
            return None
        delta = self._merged_delta((*self.merged_adapters, *to_merge))
        return to_merge, merged_weight(self.base_layer, [delta])

    def install_merge(self, prepared: tuple[tuple[str, ...], torch.Tensor]) -> None:
        """Keep ``W`` beside the quantized base (which is not touched)."""
        to_merge, weight = prepared
        adapters = (*self.merged_adapters, *to_merge)
        self._merge_state = MergeState(adapters, nn.Parameter(weight, requires_grad=False), None)

    def unmerge(self) -> None:
        """Drop the merged float weight; the quantized base was never changed."""
        self._merge_state = MergeState((), None, None)

    def forget_original(self) -> None:
        self._merge_state = MergeState((), None, None)

    def unloaded_module(self, float_dtype: torch.dtype | None = None) -> nn.Module:
        """What replaces this layer in ``merge_and_unload``: a plain ``nn.Linear`` in
        ``float_dtype`` holding ``dequant(W0)`` plus the merged adapters (computed in float32,
        rounded once). ``merge_and_unload`` passes the model's own float dtype (or the one it
        was asked for); None here means float32."""
        state = self._merge_state
        weight = state.weight if state.adapters else quantized.dequantized_weight(self.base_layer)
        self.forget_original()
        return float_linear(self.base_layer, weight.detach(), float_dtype or torch.float32)
