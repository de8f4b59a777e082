"""Writing a base-changing init's ``W_res`` into the base weights, in two phases.

PiSSA, OLoRA and LoftQ (``lorakit.init_methods``) give each adapted layer factors from its base
weight ``W0`` (d x k) and a new base ``W_res``. An inject or a load rewrites many layers, and
the slow and fallible part is the factorisation (an SVD or QR per layer: minutes on a 7B
model, the time a user presses Ctrl-C in, and the step that can fail to converge). So:

1. ``plan_rewrite`` per layer: factorise, keep the float32 factors ``A`` (r x k), ``B`` (d x r)
   (rounded as the adapter stores them, when that is coarser than the base: bfloat16 factors
   on a float32 base) and how ``W_res`` follows from ``W0`` (``W0 - s B A`` with those
   factors; LoftQ: ``deq(quant(W0 - B' A'))``),
   record the fingerprint of ``W0``. Nothing in the model changes: a failure here (or Ctrl-C)
   leaves every base weight as it was, with no copy of any of them kept.
2. ``write_rewrites``: compute each ``W_res`` again from its recipe (the same float32
   operations on the same tensors: the same bits as computing it in phase 1) and write it in
   place. Ctrl-C is held back until every layer is written (``interrupts_held``); any other
   failure (memory for one d x k temporary) puts back the layers already written, exactly up to
   one rounding to the base dtype for PiSSA / OLoRA (``W_res + s B A``); LoftQ's quantized
   residual cannot give ``W0`` back, and the error names those layers.

Keeping a copy of every rewritten weight to undo a failure instead would double the memory of
every adapted weight (13 GB more for a 7B model's projections in fp16).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import init_factors
from lorakit.init_factors import Residual
from lorakit.init_methods import LoftQConfig

__all__ = [
    "BaseRewrite",
    "interrupts_held",
    "plan_rewrite",
    "write_rewrites",
]


@dataclass
class BaseRewrite:
    """One layer's ``W_res``, planned and not yet written."""

    name: str
    """The layer's module path (for errors)."""
    layer: nn.Module
    """The ``LoraLinear`` whose ``base_layer.weight`` is rewritten."""
    init: str
    residual: Residual
    """``W0 (d, k) float32 -> W_res (d, k) float32``."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    """The init's float32 factors (r, k) and (d, r): what puts ``W0`` back for PiSSA / OLoRA."""
    scale: float

    def _weight_dk(self) -> torch.Tensor:
        weight = self.layer.base_layer.weight
        return weight.t() if self.layer.fan_in_fan_out else weight

    def write(self) -> None:
        """``W0 <- W_res`` in place (rounded to the weight's dtype)."""
        weight = self._weight_dk()
        with torch.no_grad():
            weight.copy_(self.residual(weight.to(torch.float32)).to(weight.dtype))
        self.layer.row_norms.clear()  # every adapter's cached DoRA norms used the old base

    def put_back(self) -> bool:
        """``W_res <- W_res + s B A`` (``W0`` up to one rounding to the weight's dtype): True;
        False for LoftQ, whose quantized residual does not determine ``W0``."""
        if self.init == "loftq":
            return False
        weight = self._weight_dk()
        with torch.no_grad():
            restored = weight.to(torch.float32) + self.scale * self.lora_B @ self.lora_A
            weight.copy_(restored.to(weight.dtype))
        self.layer.row_norms.clear()
        return True


def plan_rewrite(
    layer, name: str, adapter_name: str, init: str, loftq: LoftQConfig | None = None
) -> BaseRewrite:
    """Phase 1 for ``layer`` (a ``LoraLinear`` holding ``adapter_name``): the factors of
    ``init`` from its base weight with the adapter's rank and scaling, and the fingerprint of
    that weight in ``layer.base_fingerprints_before_init[adapter_name]`` (what a converted
    adapter fits). The weight is not changed. Where the adapter's factors are stored coarser
    than the base weight (``_coarser_factor_dtype``), ``W_res`` follows from the factors as
    stored (``init_factors.factors_for``)."""
    from lorakit.io.fingerprint import weight_fingerprint

    base_weight = layer.base_layer.weight
    scale = layer.scalings[adapter_name]
    with torch.no_grad():
        weight = base_weight.t() if layer.fan_in_fan_out else base_weight  # (d, k)
        lora_A, lora_B, residual = init_factors.factors_for(
            init,
            weight.to(torch.float32),
            layer.ranks[adapter_name],
            scale,
            loftq,
            factor_dtype=_coarser_factor_dtype(layer, adapter_name),
        )
    layer.base_fingerprints_before_init[adapter_name] = weight_fingerprint(base_weight)
    return BaseRewrite(name, layer, init, residual, lora_A, lora_B, scale)


def _coarser_factor_dtype(layer, adapter_name: str) -> torch.dtype | None:
    """The dtype of the adapter's factors when it is coarser than the base weight's (bfloat16
    factors on a float32 base), else None: only then does rounding the factors move
    ``W_res + s B A`` off ``W0`` by more than the base's own rounding of ``W_res``. (On a
    bfloat16 base with bfloat16 factors, PEFT's ``autocast_adapter_dtype=False``, ``W_res``
    stays PEFT's, from the float32 factors.)"""
    stored = layer.adapter_parameters(adapter_name)[0].dtype
    base = layer.base_layer.weight.dtype
    if not (stored.is_floating_point and base.is_floating_point):
        return None
    return stored if torch.finfo(stored).eps > torch.finfo(base).eps else None


def write_rewrites(rewrites: Sequence[BaseRewrite]) -> None:
    """Phase 2: write every planned ``W_res``. On a failure the layers already written are put
    back (``BaseRewrite.put_back``) before the error goes on; it names any that cannot be."""
    written: list[BaseRewrite] = []
    try:
        for rewrite in rewrites:
            rewrite.write()
            written.append(rewrite)
    except BaseException as error:
        lost = [rewrite.name for rewrite in reversed(written) if not rewrite.put_back()]
        if lost:
            error.add_note(
                f"lorakit: the base weights of {lost} already hold LoftQ's quantized residual, "
                "which does not give the original back: load the model again."
            )
        raise


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the block: a KeyboardInterrupt received inside is raised
    when the block ends normally. Only in the main thread, where Python handles signals, and
    only over Python's own handler; elsewhere the block runs as is."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
