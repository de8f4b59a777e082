"""DoRA's per-layer state: the magnitude vector and the row norms, cached.

DoRA (``LoraConfig(use_dora=True)``, maths in ``lorakit.functional``) gives each adapter of a
``LoraLinear`` a magnitude ``m`` (d,) and scales the adapter's rows by ``f = m / n`` with
``n = ||W0 + s B A||_row``. The magnitude lives in ``lora_magnitude_vector[<adapter>].weight``,
PEFT's name in the model; in a file it is ``<path>.lora_magnitude_vector`` (no ``.weight``).

``RowNorms`` keeps ``||W0_i||^2`` (computed once per base weight, in float32) and each
adapter's ``n`` until W0, A or B change: inference computes ``n`` once. A frozen tensor is known
unchanged by its version counter (which an in-place update such as ``copy_`` bumps) and data
pointer; one that requires grad is also compared by value with a copy kept when the norms were
computed (an optimiser may step it in place without bumping its counter, as torch's fused AdamW
does, and a hand-written step through ``.data`` bumps nothing; a copy sees both, in any order of
backward, forward and step). The copies are the adapter's size; their cost falls on forwards of
a model whose adapter still requires grad (training, and inference right after it); a frozen
adapter, as ``lorakit eval``/``generate``/``merge`` and the serving bank use, has none. A
training step computes ``n`` once per forward; evaluation between steps and decoding reuse it.
Under ``torch.inference_mode`` the cached values are computed with inference mode locally off
(``_normal_tensors``): an inference tensor could not be saved by a later training step's
backward, and decoding under inference mode reuses them like any other. An inference tensor
among the inputs (no version to follow) is never cached. The layer clears the cache when it
is converted (``LoraLinear._apply``, behind ``.to()``/``.half()``: a round trip through another
dtype can land on the old address). A write through ``.data`` to a FROZEN tensor bumps no
counter and is not seen: call ``clear()`` after one.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from lorakit import functional
from lorakit.dora_norms import ZeroRowNormsError

__all__ = ["Magnitude", "RowNorms"]


class Magnitude(nn.Module):
    """DoRA's magnitude ``m`` (d,) of one adapter, as ``weight`` (PEFT's ``DoraLinearLayer``
    holds it the same way, so the model's state-dict keys match PEFT's)."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(values)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def _marks(tensor: torch.Tensor) -> tuple | None:
    """``(version, data pointer)`` of ``tensor``; None for an inference tensor (no version) or a
    meta tensor (no values: nothing is cached from it)."""
    if tensor.is_meta:
        return None
    try:
        return tensor._version, tensor.data_ptr()
    except RuntimeError:
        return None


def _stamp(tensor: torch.Tensor) -> tuple | None:
    """What tells later whether ``tensor`` changed: its version and data pointer and, if it
    requires grad, a copy of its values (an in-place optimiser step or a ``.data`` write may
    leave both marks as they were); None for an inference tensor (no version)."""
    marks = _marks(tensor)
    if marks is None or not tensor.requires_grad:
        return marks
    return *marks, tensor.detach().clone()


def _same(stamp: tuple | None, tensor: torch.Tensor) -> bool:
    """``tensor`` is as it was when ``stamp`` was taken (``_stamp``)."""
    marks = _marks(tensor)
    if stamp is None or marks is None or stamp[:2] != marks:
        return False
    if len(stamp) == 2:  # frozen then: version and pointer
        return not tensor.requires_grad
    return tensor.requires_grad and torch.equal(stamp[2], tensor.detach())


def _normal_tensors() -> contextlib.AbstractContextManager:
    """Where ``torch.inference_mode`` is on, inference mode off and gradients off, so that what
    is computed from parameters is a normal, cacheable tensor (a no-op elsewhere, and while
    ``torch.compile`` traces: nothing is cached then, and the tracer refuses the query)."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


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
    unchanged = all(_same(s, t) for s, t in zip(entry.stamps, tensors, strict=True))
    return entry.values if unchanged else None


def _entry(tensors: tuple, key: tuple, values: tuple) -> _Entry | None:
    """A cache entry for ``values``, or None where nothing may be kept: while compiling, or
    for inference tensors (a later backward cannot save them; ``_stamp`` cannot follow them)."""
    if torch.compiler.is_compiling() or any(v.is_inference() for v in values):
        return None
    stamps = [_stamp(t) for t in tensors]
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
        with _normal_tensors():
            factor = functional.dora_factor(magnitude.detach(), norms)  # (d,)
            gain = (factor - 1.0).to(dtype)
            scaled_B = (lora_B.detach().to(factor.dtype) * factor[:, None]).to(dtype)  # (d, r)
        entry = _entry(tensors, key, (gain, scaled_B))
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
        with _normal_tensors():
            sq_norms = functional.base_row_sq_norms(weight, fan_in_fan_out, dtype)
        entry = _entry((weight,), key, (sq_norms,))
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
        """``n = ||W0 + s B A||_row`` (d,), detached, reused while W0, A, B are unchanged.
        ``ZeroRowNormsError`` (naming ``adapter_name``) where a row's ``n`` is 0: a new adapter's
        ``m = n`` is computed here, so a layer whose base weight has all-zero rows is refused
        as the adapter is created (inject undoes what it did: nothing is changed)."""
        tensors, key = (weight, lora_A, lora_B), (scale,)
        found = _reuse(self._norms.get(adapter_name), tensors, key)
        if found is not None:
            return found[0]
        dtype = functional.norm_dtype(weight, lora_A, lora_B)
        base_sq = self.base_sq_norms(weight, fan_in_fan_out, dtype)
        try:
            with _normal_tensors():
                norms = functional.dora_row_norms(
                    base_sq, weight, lora_A, lora_B, scale, fan_in_fan_out
                )
        except ZeroRowNormsError as error:  # the same, naming the adapter
            raise ZeroRowNormsError(error.rows, error.shape, adapter_name) from None
        entry = _entry(tensors, key, (norms,))
        if entry is not None:
            self._norms[adapter_name] = entry
        return norms
