"""Which bitsandbytes layers lorakit can use, and the refusals of the others
(``UnsupportedQuantizedLayerError``, saying why and what to do): ``is_4bit`` tells a
``Linear4bit`` from a ``Linear8bitLt``; ``check`` refuses a layer not quantized yet, an 8-bit
one with ``has_fp16_weights=True`` and a 4-bit one bitsandbytes repacked for its CPU kernel
unasked; ``check_dequantizable`` refuses to read ``W0`` of a repacked layer (merge, training);
``check_inference`` refuses a gradient through one. ``lorakit.quantized.bnb`` (the backend)
calls them and exports ``is_4bit``, ``check`` and ``check_dequantizable``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.quantized.bnb_cpu_kernel import CPU_KERNEL_MARK, is_packed_state

__all__ = ["check", "check_dequantizable", "check_inference", "is_4bit"]


def is_4bit(module: nn.Module) -> bool:
    """True for ``Linear4bit`` (and subclasses), False for ``Linear8bitLt``."""
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def check(module: nn.Module) -> None:
    """Refuse a 4-bit layer without quantized weights or one bitsandbytes repacked for its CPU
    inference kernel unasked (``UnsupportedQuantizedLayerError``); one repacked on purpose
    (``CPU_KERNEL_MARK``) passes, for inference only."""
    from lorakit.quantized import UnsupportedQuantizedLayerError

    if not is_4bit(module):
        if module.weight.dtype != torch.int8:
            raise UnsupportedQuantizedLayerError(_not_int8_reason(module))
        return
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        raise UnsupportedQuantizedLayerError(
            "this Linear4bit is not quantized yet (no quant_state); move it to a device first "
            "(.to('cpu') quantizes it) or load the model with BitsAndBytesConfig"
        )
    if is_packed_state(state) and not getattr(module, CPU_KERNEL_MARK, False):
        raise UnsupportedQuantizedLayerError(
            "this Linear4bit was repacked in place for bitsandbytes' CPU inference kernel (an "
            "eval-mode, no-grad forward on an AVX512-BF16 CPU did it); its stored bytes are no "
            "longer the checkpoint's, and the repacking cannot be undone exactly. Load the model "
            "afresh, then turn that repacking off before any eval-mode forward: load it with "
            "lorakit.models.load_model(..., quantization=...), or call lorakit.inject / "
            "lorakit.load_adapter on it, or lorakit.quantized.loading.keep_4bit_storage(model); "
            "each does so on every Linear4bit of the model, adapted or not. (To run inference "
            "with that kernel on purpose, add or load the adapters first, then call "
            "lorakit.quantized.bnb_cpu_kernel.use_bnb_cpu_kernel(model); it cannot be merged.)"
        )


def _has_fp16_weights(module: nn.Module) -> bool:
    """True for a ``Linear8bitLt`` built with ``has_fp16_weights=True`` (on its state or its
    weight): it keeps a float weight that it trains, and never holds int8 codes."""
    state = getattr(module, "state", None)
    return bool(
        getattr(state, "has_fp16_weights", False)
        or getattr(module.weight, "has_fp16_weights", False)
    )


def _not_int8_reason(module: nn.Module) -> str:
    """Why a ``Linear8bitLt`` without int8 weights cannot be a LoRA base, and what to do."""
    if _has_fp16_weights(module):
        return (
            f"this Linear8bitLt has has_fp16_weights=True: it keeps a trainable "
            f"{module.weight.dtype} weight (transformers' "
            "BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True)) and never "
            "holds int8 codes, so it is no int8 base. To train LoRA on an int8 base, reload the "
            "model with llm_int8_has_fp16_weight=False (the default; has_fp16_weights=False "
            "for a Linear8bitLt you build), or load the model in float"
        )
    return (
        f"this Linear8bitLt holds {module.weight.dtype} weights, not int8 (not quantized yet); "
        "move it to a device first (.to('cpu') quantizes it) or load the model with "
        "BitsAndBytesConfig"
    )


def check_dequantizable(module: nn.Module) -> None:
    """Refuse (``UnsupportedQuantizedLayerError``) a ``Linear4bit`` repacked for bitsandbytes'
    CPU kernel (``use_bnb_cpu_kernel``, or repacked unasked): its ``W0`` cannot be read exactly,
    so it cannot be merged or trained. ``merge`` / ``merge_and_unload`` ask this of every layer
    they will dequantize before changing any, and name the module."""
    if is_4bit(module) and (
        is_packed_state(module.weight.quant_state) or getattr(module, CPU_KERNEL_MARK, False)
    ):
        from lorakit.quantized import UnsupportedQuantizedLayerError

        raise UnsupportedQuantizedLayerError(
            "this Linear4bit was repacked for bitsandbytes' CPU inference kernel "
            "(use_bnb_cpu_kernel / --bnb-cpu-kernel): its scales were rounded to bfloat16, so "
            "its W0 cannot be read exactly; it runs inference only (no training, no merge). "
            "Load the model afresh without that option to train or merge."
        )


def check_inference(module: nn.Module, x: torch.Tensor) -> None:
    """A repacked layer (``bnb_cpu_kernel``) runs only where no gradient flows through it:
    bitsandbytes' CPU kernel has no backward, so a LoRA layer before it would get none."""
    if torch.is_grad_enabled() and x.requires_grad:
        from lorakit.quantized import UnsupportedQuantizedLayerError

        raise UnsupportedQuantizedLayerError(
            "this Linear4bit was repacked for bitsandbytes' CPU inference kernel "
            "(use_bnb_cpu_kernel / --bnb-cpu-kernel), which has no backward: it runs inference "
            "only (torch.no_grad()). To train, load the model afresh without that option."
        )
