"""A trainable bias on B (PEFT's ``lora_bias=True``), for ``LoraLinear``.

The branch is ``s (B A x + b)`` with ``b`` (d,) stored as ``lora_B[adapter].bias`` (the file key
``<path>.lora_B.bias``, as PEFT's ``nn.Linear(r, d, bias=True)``); the maths is
``lorakit.functional.lora_bias_delta``. Merging adds ``s b`` to the base bias: a NEW bias
Parameter is installed and the original kept aside, so unmerging is exact, as for the weight
(``layers/merging.py``). The fast path adds ``s b`` to the base bias it passes to the fused call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lorakit import functional
from lorakit.init_factors import DRAW_DTYPE
from lorakit.layers.adapter_tables import round_through_base_dtype

__all__ = ["LoraBiasMixin", "LoraBiases"]


class LoraBiases(NamedTuple):
    """The last item of ``fast_adapters`` when some adapters have a bias on B: their names."""

    names: tuple[str, ...]


class LoraBiasMixin:
    """``lora_bias`` for a LoRA layer whose ``lora_B[adapter]`` is an ``nn.Linear`` and whose
    base has ``out_features``, ``weight`` and ``bias`` (``LoraLinear``)."""

    _kept_bias: tuple[nn.Parameter | None, ...] = ()
    """``(original base bias,)`` while a bias on B is merged (a tuple: an attribute holding a
    Parameter would register it as one of the layer's)."""

    supports_lora_bias = True

    def new_factors_with_bias(
        self, rank: int, init: bool | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New ``(A, B, b)`` drawn in PEFT's order: ``nn.Linear(k, r)`` draws A,
        ``nn.Linear(r, d, bias=True)`` draws B and then its bias ``U(-1/sqrt(r), 1/sqrt(r))``,
        and only then does init True redraw A (kaiming-uniform) and zero B and b (False keeps
        the construction draws; ``LoraConfig`` takes ``lora_bias`` with these two only, as
        PEFT); on a float16 / bfloat16 base all three are rounded through its dtype, as PEFT's
        are. All three are drawn in float32 and cast to ``dtype`` at the end (a float64 base
        too), as PEFT's ``nn.Linear`` draws them. The same seed thus gives PEFT's A, B and b."""
        lora_A, lora_B = self._new_factors(rank, False, DRAW_DTYPE)  # the two weights' draws
        bias = torch.empty(self.out_features, dtype=DRAW_DTYPE, device=lora_B.device)
        bound = 1 / math.sqrt(rank)
        nn.init.uniform_(bias, -bound, bound)
        if init is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            nn.init.zeros_(lora_B)
            nn.init.zeros_(bias)
        round_through_base_dtype((lora_A, lora_B, bias), self.base_float_dtype)  # as PEFT's
        return lora_A.to(dtype), lora_B.to(dtype), bias.to(dtype)

    def add_lora_bias(
        self, adapter_name: str, init: bool | str | None, bias: torch.Tensor | None = None
    ) -> None:
        """A bias ``b`` (d,) on B, in B's dtype: ``bias`` when given (from
        ``new_factors_with_bias``, taken over), else zeros for ``init`` True, nn.Linear's draw
        ``U(-1/sqrt(r), 1/sqrt(r))`` for False (as PEFT's ``nn.Linear(r, d, bias=True)``),
        uninitialised for None (about to be loaded)."""
        factor = self.lora_B[adapter_name]
        if bias is None:
            bias = torch.empty(
                self.out_features, dtype=factor.weight.dtype, device=factor.weight.device
            )
            if init is True:
                nn.init.zeros_(bias)
            elif init is not None:
                bound = 1 / math.sqrt(factor.weight.shape[1])
                nn.init.uniform_(bias, -bound, bound)
        factor.register_parameter("bias", nn.Parameter(bias))

    def lora_bias_of(self, adapter_name: str) -> nn.Parameter | None:
        """The bias on B of ``adapter_name`` (d,), or None for an adapter without one."""
        return self.lora_B[adapter_name].bias

    @property
    def original_bias(self) -> torch.Tensor | None:
        """The base bias without any merged ``s b`` (what the layer was built with)."""
        return self._kept_bias[0] if self._kept_bias else self.base_layer.bias

    def _bias_for(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The base bias that goes with ``weight``: the original one with the original weight,
        the layer's (merged) one with the merged weight."""
        return self.original_bias if weight is self.original_weight else self.base_layer.bias

    def _merged_bias(
        self, adapter_names: Sequence[str], dtype: torch.dtype | None = None
    ) -> torch.Tensor | None:
        """``bias0 + sum_a s_a b_a`` over the named adapters that have a bias on B (summed in
        ``functional.merge_dtype``: float32, float64 on a float64 base; rounded once to
        ``dtype``, default bias0's); None when none of them has one. Raises
        ValueError when the base layer has no bias to merge into (PEFT refuses this merge too)."""
        names = [n for n in adapter_names if self.lora_bias_of(n) is not None]
        if not names:
            return None
        original = self.original_bias
        if original is None:
            raise ValueError(
                f"cannot merge adapter(s) {names}: they have a bias on lora_B (lora_bias=True) "
                f"but the base {type(self.base_layer).__name__} has no bias to add it to; use "
                "the adapter unmerged."
            )
        total = original.detach().to(functional.merge_dtype(original.dtype))
        for name in names:
            total = total + functional.lora_bias_delta(self.lora_bias_of(name), self.scalings[name])
        return total.to(dtype or original.dtype)

    def prepare_merge(self, adapter_names: Sequence[str], dtype: torch.dtype | None = None):
        """``(names, W, bias)``: the base's ``prepare_merge`` plus the merged bias (None when
        no merged adapter has a bias on B), both rounded once to ``dtype`` (default: the
        base's)."""
        prepared = super().prepare_merge(adapter_names, dtype)
        if prepared is None:
            return None
        with torch.no_grad():
            bias = self._merged_bias((*self.merged_adapters, *prepared[0]), dtype)
        if bias is not None and not torch.isfinite(bias).all():
            raise ValueError(
                f"merging adapter(s) {list(prepared[0])} would put non-finite values into the "
                "base bias; nothing was changed."
            )
        return (*prepared, bias)

    def install_merge(self, prepared) -> None:
        """Install the merged weight, then the merged bias (a new Parameter; the original one
        is kept for ``unmerge``). A forward in another thread between the two swaps may see
        the merged weight with the unmerged bias of a ``lora_bias`` adapter."""
        names, weight, bias = prepared
        super().install_merge((names, weight))
        if bias is not None:
            original = self.original_bias
            self.base_layer.bias = nn.Parameter(bias, requires_grad=False)
            self._kept_bias = (original,)

    def unmerge(self) -> None:
        """Put the original weight and bias Parameters back (bit-identical)."""
        super().unmerge()
        if self._kept_bias:
            self.base_layer.bias = self._kept_bias[0]
            self._kept_bias = ()

    def forget_original(self) -> None:
        super().forget_original()
        self._kept_bias = ()

    def bias_with_lora_biases(
        self, bias: torch.Tensor | None, names: Sequence[str], dtype: torch.dtype
    ) -> torch.Tensor:
        """``bias0 + sum_a s_a b_a`` in ``dtype`` with autograd (the fast path's bias)."""
        total = sum(
            functional.lora_bias_delta(self.lora_bias_of(n), self.scalings[n]) for n in names
        )
        return (total if bias is None else bias + total).to(dtype)
