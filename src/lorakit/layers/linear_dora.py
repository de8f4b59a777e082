"""``LinearDora``: DoRA on a linear layer, the part of ``lorakit.layers.linear.LoraLinear`` that
holds a DoRA adapter's magnitude ``m`` (d,) and computes with it (maths: ``lorakit.functional``)::

    n = ||W0 + s B A||_row (cached, ``layers/dora.py``),   f = m / n
    h = W0 x + (f - 1) (W0 x~) + f s B A x~,   merged: W = f * (W0 + s B A)

``add_magnitude`` (PEFT's initialisation ``m = n``), ``dora_branch`` for the plain forward,
``_dora_side`` for the fused one (``lorakit.fast``) and ``merge_delta``. A mixin: it uses the
``LoraLinear`` it is part of (``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``row_norms``,
``scalings``, ``fan_in_fan_out``, ``original_weight``, ``lora_branch``, ``delta_weight``).
"""

from __future__ import annotations

import torch

from lorakit import fast, functional
from lorakit.layers.dora import Magnitude

__all__ = ["LinearDora"]


class LinearDora:
    """DoRA adapters of ``LoraLinear``: an adapter is DoRA when it has a magnitude vector."""

    supports_dora = True

    def is_dora(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_magnitude_vector

    def add_magnitude(self, adapter_name: str, initialise: bool) -> None:
        """``m = ||W0 + s B A||_row`` (d,), in A's dtype (PEFT's initialisation)."""
        lora_A = self.lora_A[adapter_name].weight
        values = torch.empty(self.out_features, dtype=lora_A.dtype, device=lora_A.device)
        self.lora_magnitude_vector[adapter_name] = Magnitude(values)
        if initialise:
            with torch.no_grad():
                values.copy_(self.dora_row_norms(adapter_name, self.original_weight))

    def dora_row_norms(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``n = ||W + s B A||_row`` (d,) for base weight ``weight`` (detached, cached)."""
        return self.row_norms.row_norms(
            adapter_name,
            weight,
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scalings[adapter_name],
            self.fan_in_fan_out,
        )

    def dora_factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``f = m / n`` (d,); gradient to ``m`` only."""
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        return functional.dora_factor(magnitude, self.dora_row_norms(adapter_name, weight))

    def adapter_branch(
        self, adapter_name: str, x: torch.Tensor, weight: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        if self.is_dora(adapter_name):
            return self.dora_branch(adapter_name, x, weight, base_out)
        return self.lora_branch(adapter_name, x)

    def dora_branch(
        self, adapter_name: str, x: torch.Tensor, weight: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        """``(f - 1) (W0 x~) + f s B A x~`` with ``x~ = dropout(x)``. Without dropout ``W0 x``
        is ``base_out`` less the bias; with dropout it is a second product on ``x~`` (as PEFT)."""
        dropout = self.dropouts[adapter_name] if self.training else 0.0
        if dropout > 0.0:
            x = torch.nn.functional.dropout(x, p=dropout, training=True)
            base_part = fast.linear_output(x, weight, None, self.fan_in_fan_out)
        else:
            bias = self._bias_for(weight)
            base_part = base_out if bias is None else base_out - bias
        lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        lora_part = functional.lora_forward(x, lora_A, lora_B, self.scalings[adapter_name])
        return functional.dora_output(base_part, lora_part, self.dora_factor(adapter_name, weight))

    def _dora_side(self, name: str, side: fast.RankSide, weight: torch.Tensor) -> fast.DoraSide:
        magnitude = self.lora_magnitude_vector[name].weight
        norms = self.dora_row_norms(name, weight)
        lora_B = side.lora_B

        def scales(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return self.row_norms.inference_scales(name, norms, magnitude, lora_B, dtype)

        return fast.DoraSide(side, magnitude, norms, scales)

    def merge_delta(self, adapter_name: str) -> torch.Tensor:
        if not self.is_dora(adapter_name):
            return self.delta_weight(adapter_name)
        weight = self.original_weight
        return functional.dora_merge_delta(
            weight,
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scalings[adapter_name],
            self.lora_magnitude_vector[adapter_name].weight,
            self.dora_row_norms(adapter_name, weight),
            self.fan_in_fan_out,
        )
