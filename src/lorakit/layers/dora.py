"""DoRA's per-layer state: the magnitude vector and the row norms, cached.

DoRA (``LoraConfig(use_dora=True)``, maths in ``lorakit.functional``) gives each adapter of a
``LoraLinear`` a magnitude ``m`` (d,) and scales the adapter's rows by ``f = m / n`` with
``n = ||W0 + s B A||_row``. The magnitude lives in ``lora_magnitude_vector[<adapter>].weight``,
PEFT's name in the model; in a file it is ``<path>.lora_magnitude_vector`` (no ``.weight``).

``RowNorms`` keeps ``||W0_i||^2`` (computed once per base weight, in float32) and each
adapter's ``n`` until W0, A or B change (their version counters, which an in-place update such
as ``copy_`` bumps): inference computes ``n`` once. Nothing is cached for a tensor that requires
grad: an optimiser may change it in place without bumping its counter (torch's fused AdamW does,
on CPU), so while an adapter trains ``n`` is computed at every forward, as PEFT does. A write
through ``.data`` bumps no counter and is not seen: call ``clear()`` after one.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import functional

__all__ = ["Magnitude", "RowNorms"]


class Magnitude(nn.Module):
    """DoRA's magnitude ``m`` (d,) of one adapter, as ``weight`` (PEFT's ``DoraLinearLayer``
    holds it the same way, so the model's state-dict keys match PEFT's)."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(values)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def _stamp(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(version, data pointer)`` of ``tensor``; None (nothing is cached for it) for a tensor
    that requires grad (torch's fused AdamW steps it in place without bumping its version) or
    an inference tensor (no version counter)."""
    if tensor.requires_grad:
        return None
    try:
        return tensor._version, tensor.data_ptr()
    except RuntimeError:
        return None


def _same(cached: tuple, tensors: tuple) -> bool:
    """True when ``cached`` holds the very tensor objects ``tensors`` (identity, in order)."""
    return all(a is b for a, b in zip(cached, tensors, strict=True))


class RowNorms:
    """Cached ``||W0_i||^2`` and per-adapter row norms ``n`` of one layer (not a module: no
    state-dict entries). An entry is reused only for the very same tensors at the same
    versions; nothing is cached while ``torch.compile`` traces."""

    def __init__(self) -> None:
        self._base: tuple | None = None  # (W0, stamp, fan_in_fan_out, dtype, ||W0_i||^2)
        self._norms: dict[str, tuple] = {}  # adapter -> (W0, A, B, stamps, scale, n)
        self._scales: dict[str, tuple] = {}  # adapter -> (n, m, B, stamps, dtype, f - 1, f B)

    def clear(self, adapter_name: str | None = None) -> None:
        if adapter_name is None:
            self._base = None
            self._norms.clear()
            self._scales.clear()
        else:
            self._norms.pop(adapter_name, None)
            self._scales.pop(adapter_name, None)

    def inference_scales(
        self,
        adapter_name: str,
        norms: torch.Tensor,
        magnitude: torch.Tensor,
        lora_B: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f - 1, f B)`` in ``dtype`` for a call without autograd, reused while ``n``, ``m``
        and B are unchanged (decoding then spends no time on them)."""
        stamps = [_stamp(magnitude), _stamp(lora_B)]
        cached = self._scales.get(adapter_name)
        hit = cached is not None and _same(cached[:3], (norms, magnitude, lora_B))
        if hit and None not in stamps and cached[3:5] == (stamps, dtype):
            return cached[5], cached[6]
        factor = functional.dora_factor(magnitude.detach(), norms)  # (d,)
        gain = (factor - 1.0).to(dtype)
        scaled_B = (lora_B.detach().to(factor.dtype) * factor[:, None]).to(dtype)  # (d, r)
        if None not in stamps and not torch.compiler.is_compiling():
            self._scales[adapter_name] = (norms, magnitude, lora_B, stamps, dtype, gain, scaled_B)
        return gain, scaled_B

    def base_sq_norms(
        self, weight: torch.Tensor, fan_in_fan_out: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """``||W0_i||^2`` (d,) in ``dtype``, computed once per weight version."""
        stamp = None if torch.compiler.is_compiling() else _stamp(weight)
        cached = self._base
        key = (stamp, fan_in_fan_out, dtype)
        if stamp is not None and cached is not None and cached[0] is weight and cached[1:4] == key:
            return cached[4]
        sq_norms = functional.base_row_sq_norms(weight, fan_in_fan_out, dtype)
        if stamp is not None:
            self._base = (weight, stamp, fan_in_fan_out, dtype, sq_norms)
        return sq_norms

    def row_norms(
        self,
        adapter_name: str,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
        fan_in_fan_out: bool,
    ) -> torch.Tensor:
        """``n = ||W0 + s B A||_row`` (d,), detached, reused while W0, A, B are unchanged."""
        compiling = torch.compiler.is_compiling()
        stamps = None if compiling else [_stamp(t) for t in (weight, lora_A, lora_B)]
        cached = self._norms.get(adapter_name)
        hit = cached is not None and _same(cached[:3], (weight, lora_A, lora_B))
        if hit and stamps is not None and None not in stamps and cached[3:5] == (stamps, scale):
            return cached[5]
        dtype = functional.norm_dtype(weight, lora_A, lora_B)
        base_sq = self.base_sq_norms(weight, fan_in_fan_out, dtype)
        norms = functional.dora_row_norms(base_sq, weight, lora_A, lora_B, scale, fan_in_fan_out)
        if stamps is not None and None not in stamps:
            self._norms[adapter_name] = (weight, lora_A, lora_B, stamps, scale, norms)
        return norms
