"""DoRA's per-layer state: the magnitude vector and the row norms, cached.

DoRA (``LoraConfig(use_dora=True)``, maths in ``lorakit.functional``) gives each adapter of a
``LoraLinear`` a magnitude ``m`` (d,) and scales the adapter's rows by ``f = m / n`` with
``n = ||W0 + s B A||_row``. The magnitude lives in ``lora_magnitude_vector[<adapter>].weight``,
PEFT's name in the model; in a file it is ``<path>.lora_magnitude_vector`` (no ``.weight``).

``RowNorms`` keeps ``||W0_i||^2`` (computed once per base weight, in float32) and each
adapter's ``n`` until W0, A or B change: inference computes ``n`` once. A frozen tensor is
known unchanged by its version counter (which an in-place update such as ``copy_`` bumps); a
tensor that requires grad by a copy of its values, compared at each use (an optimiser may
change it in place without bumping its counter: torch's fused AdamW does), so a trainable
adapter evaluated between steps reuses ``n`` until the next step changes A or B, and gradient
accumulation's micro-steps compute it once. A trainable W0 is not copied: nothing is cached for
it, nor anything computed under ``torch.inference_mode`` (an inference tensor cannot be saved
for a later training step's backward). A write through ``.data`` to a frozen tensor bumps no
counter and is not seen: call ``clear()`` after one.
"""

from __future__ import annotations

from typing import NamedTuple

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


def _stamp(tensor: torch.Tensor, *, snapshot: bool = True) -> object:
    """What tells later whether ``tensor`` changed (``_unchanged``): its ``(version, data
    pointer)``; for a tensor that requires grad a copy of its values instead (torch's fused
    AdamW steps parameters in place without bumping their versions), or None where
    ``snapshot`` is False (then nothing is cached); None for an inference tensor (no version)."""
    if tensor.requires_grad:
        return tensor.detach().clone() if snapshot else None
    try:
        return tensor._version, tensor.data_ptr()
    except RuntimeError:
        return None


def _unchanged(stamp: object, tensor: torch.Tensor) -> bool:
    """``tensor`` holds what it held when ``stamp`` was taken (a copy: the same values)."""
    if stamp is None:
        return False
    if isinstance(stamp, torch.Tensor):
        return tensor.requires_grad and torch.equal(stamp, tensor.detach())
    if tensor.requires_grad:
        return False
    try:
        return stamp == (tensor._version, tensor.data_ptr())
    except RuntimeError:
        return False


class _Entry(NamedTuple):
    """Values computed from ``tensors`` (the very objects), reused while every one of them is
    unchanged (``stamps``) and ``key`` (the other inputs) is the same."""

    tensors: tuple
    stamps: list
    key: tuple
    values: tuple


def _reuse(entry: _Entry | None, tensors: tuple, key: tuple) -> tuple | None:
    """``entry.values`` when ``entry`` was made from these very, unchanged ``tensors`` with this
    ``key``; None otherwise (and always while ``torch.compile`` traces)."""
    if entry is None or torch.compiler.is_compiling() or entry.key != key:
        return None
    if not all(a is b for a, b in zip(entry.tensors, tensors, strict=True)):
        return None
    unchanged = all(_unchanged(s, t) for s, t in zip(entry.stamps, tensors, strict=True))
    return entry.values if unchanged else None


def _entry(tensors: tuple, key: tuple, values: tuple, copies: tuple) -> _Entry | None:
    """A cache entry for ``values``, or None where nothing may be kept: while compiling, for
    inference tensors (a later backward cannot save them), or for a tensor ``_stamp`` cannot
    follow (``copies[i]``: whether tensor i may be followed by a copy of its values)."""
    if torch.compiler.is_compiling() or any(v.is_inference() for v in values):
        return None
    stamps = [_stamp(t, snapshot=copy) for t, copy in zip(tensors, copies, strict=True)]
    return None if any(s is None for s in stamps) else _Entry(tensors, stamps, key, values)


class RowNorms:
    """Cached ``||W0_i||^2`` and per-adapter row norms ``n`` of one layer (not a module: no
    state-dict entries). An entry is reused only for the very same tensors at the same
    versions; nothing is cached while ``torch.compile`` traces."""

    def __init__(self) -> None:
        self._base: _Entry | None = None  # W0; (fan_in_fan_out, dtype); (||W0_i||^2,)
        self._norms: dict[str, _Entry] = {}  # adapter -> W0, A, B; (scale,); (n,)
        self._scales: dict[str, _Entry] = {}  # adapter -> n, m, B; (dtype,); (f - 1, f B)

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
        tensors, key = (norms, magnitude, lora_B), (dtype,)
        found = _reuse(self._scales.get(adapter_name), tensors, key)
        if found is not None:
            return found
        factor = functional.dora_factor(magnitude.detach(), norms)  # (d,)
        gain = (factor - 1.0).to(dtype)
        scaled_B = (lora_B.detach().to(factor.dtype) * factor[:, None]).to(dtype)  # (d, r)
        entry = _entry(tensors, key, (gain, scaled_B), copies=(False, True, True))
        if entry is not None:
            self._scales[adapter_name] = entry
        return gain, scaled_B

    def base_sq_norms(
        self, weight: torch.Tensor, fan_in_fan_out: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """``||W0_i||^2`` (d,) in ``dtype``, computed once per weight version."""
        key = (fan_in_fan_out, dtype)
        found = _reuse(self._base, (weight,), key)
        if found is not None:
            return found[0]
        sq_norms = functional.base_row_sq_norms(weight, fan_in_fan_out, dtype)
        entry = _entry((weight,), key, (sq_norms,), copies=(False,))  # (W0 is never copied)
        if entry is not None:
            self._base = entry
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
        tensors, key = (weight, lora_A, lora_B), (scale,)
        found = _reuse(self._norms.get(adapter_name), tensors, key)
        if found is not None:
            return found[0]
        dtype = functional.norm_dtype(weight, lora_A, lora_B)
        base_sq = self.base_sq_norms(weight, fan_in_fan_out, dtype)
        norms = functional.dora_row_norms(base_sq, weight, lora_A, lora_B, scale, fan_in_fan_out)
        entry = _entry(tensors, key, (norms,), copies=(False, True, True))
        if entry is not None:
            self._norms[adapter_name] = entry
        return norms
