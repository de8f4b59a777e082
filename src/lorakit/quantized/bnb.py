"""bitsandbytes bases: ``Linear4bit`` (NF4 / FP4, with or without double quantization) and
``Linear8bitLt``.

Dequantization uses bitsandbytes' own functions (the same numbers its kernels and PEFT use):

- 4-bit: ``W0 = dequantize_4bit(codes, quant_state)``: per block of ``blocksize`` weights,
  ``code_table[q] * absmax`` (with double quantization ``absmax`` is itself 8-bit blockwise).
  On a CPU, bitsandbytes 0.50 reads element (i, j)'s ``absmax`` from block
  ``i * (in // blocksize) + j // blocksize``, not the block ``(i * in + j) // blocksize`` that
  holds it: the same only where ``in`` is a multiple of ``blocksize``; its forward does the same,
  so ``W0`` here is the weight the layer computes with (docs/quantized.md, "Not done yet");
- 8-bit (LLM.int8): ``W0[i, :] = CB[i, :] * SCB[i] / 127`` (row-wise absmax scales).

The 4-bit forward calls ``bitsandbytes.matmul_4bit`` as ``Linear4bit.forward`` does in
training, but never through that forward's CPU inference branch: on a CPU with AVX512-BF16, an
eval-mode no-grad call repacks the stored bytes in place (``packing_format_for_cpu``), computes
differently (we measured 7e-2 on a 64-wide layer) and cannot be undone exactly with double
quantization. ``lorakit.inject`` (and ``load_adapter``, ``lorakit.models.load_model``) turn that
repacking off on every ``Linear4bit`` of the model, adapted or not
(``lorakit.quantized.loading.keep_4bit_storage``); a module already repacked is refused.
Repacking on purpose, for inference only, is ``lorakit.quantized.bnb_cpu_kernel``'s
``use_bnb_cpu_kernel`` (after the adapters are in place): the forward then runs bitsandbytes'
CPU kernel (``matmul_4bit`` dispatches on the repacked state) where no gradient flows, and
``dequantized_weight`` refuses it. (That module holds what tells a repacked layer,
``is_repacked`` and ``CPU_KERNEL_MARK``, and reads its codes, ``unpacked_codes``.)

The 8-bit forward is the module's own (it casts inputs to float16 for quantization, as
bitsandbytes does), except that the stored bias is never cast: for an input of another dtype
than the bias, ``bitsandbytes.matmul`` runs without it and the bias is added after
(``_int8_forward``).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.quantized.bnb_checks import check, check_dequantizable, check_inference, is_4bit
from lorakit.quantized.bnb_cpu_kernel import CPU_KERNEL_MARK, is_packed_state, unpacked_codes
from lorakit.quantized.bnb_cpu_kernel import is_packed as is_repacked

__all__ = [
    "CPU_KERNEL_MARK",
    "backward_weight",
    "base_forward",
    "check",
    "check_dequantizable",
    "dequantized_weight",
    "describe",
    "is_4bit",
    "is_repacked",
    "requantize",
    "shape",
    "storage",
]


def shape(module: nn.Module) -> tuple[int, int]:
    if is_4bit(module):
        out_features, in_features = module.weight.quant_state.shape
        return int(out_features), int(in_features)
    return tuple(module.weight.shape)


def describe(module: nn.Module) -> str:
    """``bnb-nf4``, ``bnb-fp4`` (``-dq`` with double quantization) or ``bnb-int8``."""
    if not is_4bit(module):
        return "bnb-int8"
    state = module.weight.quant_state
    nested = state.nested
    if is_packed_state(state):  # the repack expanded nested scales
        nested = getattr(state, "original_nested", nested)
    return f"bnb-{state.quant_type}" + ("-dq" if nested else "")


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """``SCB``: the weight's row-wise absmax (on the weight before the first forward, on the
    layer's ``state`` after it)."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``W0`` (out, in) in float32, by bitsandbytes' own dequantization."""
    import bitsandbytes.functional as bnb_functional

    check_dequantizable(module)
    with torch.no_grad():
        if is_4bit(module):
            weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        else:
            weight = bnb_functional.int8_vectorwise_dequant(
                module.weight.data, _int8_scales(module)
            )
    return weight.to(torch.float32)


def backward_weight(module: nn.Module, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
    """``(W, dtype)``: the dequantized weight (out, in) that bitsandbytes' own backward
    multiplies the output gradient ``G`` (..., out) by, and the dtype of that product, for a
    forward whose input (and so ``G``) is of ``grad_dtype``. ``dL/dx = (G.to(dtype) @ W)`` cast
    to ``grad_dtype`` is then the input gradient bitsandbytes (and PEFT) compute, bit for bit:

    - 4-bit (``MatMul4Bit.backward``): the forward ran in ``compute_dtype`` (``base_forward``
      casts x to it and the output back), so ``G`` is cast to it and multiplied by
      ``dequantize_4bit(W0).to(compute_dtype)``: a bfloat16 compute dtype gives a bfloat16
      product even for a float32 model. (The float32 ``dequantized_weight`` cast to it is the
      same matrix: float32 holds every value of the storage dtype exactly.)
    - 8-bit (``MatMul8bitFp`` / ``MatMul8bitLt.backward``): in the input's dtype, with
      ``W = CB * (SCB * (1 / 127))``, the row scales scaled first (``dequantized_weight``,
      bitsandbytes' ``int8_vectorwise_dequant``, computes ``(CB * SCB) * (1 / 127)``: another
      rounding, up to 2.4e-7 apart in a float32 gradient).
    """
    if is_4bit(module):
        dtype = module.compute_dtype or grad_dtype
        return dequantized_weight(module).to(dtype), dtype
    with torch.no_grad():
        row_scales = _int8_scales(module).unsqueeze(1).mul(1.0 / 127.0)  # (out, 1)
        weight = module.weight.data.to(grad_dtype, copy=True).mul_(row_scales)
    return weight, grad_dtype


def base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W0^T + b`` by bitsandbytes' kernels (4-bit: in ``compute_dtype``, returned in
    ``x``'s dtype; 8-bit: in ``x``'s dtype). Shapes: x (..., in) -> (..., out). The stored
    bias is never changed (see ``_int8_forward``). A layer ``check`` refuses is refused here
    too, by the same test on the state the kernel reads (no second lookup per call)."""
    if not is_4bit(module):
        if module.weight.dtype != torch.int8:
            check(module)  # raises, saying why
        return _int8_forward(module, x)
    import bitsandbytes as bnb

    state = getattr(module.weight, "quant_state", None)
    if state is None:
        check(module)  # raises, saying why
    if is_packed_state(state):
        check_inference(module, x)  # bitsandbytes' CPU kernel (use_bnb_cpu_kernel)
    compute_dtype = module.compute_dtype or x.dtype
    bias = module.bias
    if bias is not None and bias.dtype != compute_dtype:
        bias = bias.to(compute_dtype)
    x_compute = x if x.dtype == compute_dtype else x.to(compute_dtype)
    out = bnb.matmul_4bit(x_compute, module.weight, bias=bias, quant_state=state)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _int8_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``Linear8bitLt``'s output, without its forward's in-place cast of the bias.

    ``Linear8bitLt.forward`` casts a bias of another dtype than ``x`` for good
    (``self.bias.data = self.bias.data.to(x.dtype)``): a bfloat16 input (or autocast) would
    round a float32 bias once and for all. With no bias, or one of ``x``'s dtype, the module
    runs as it is; otherwise it runs with a cast copy of its bias swapped in for the call
    (``torch.func.functional_call``: its own forward and hooks, the stored bias untouched)."""
    bias = module.bias
    if bias is None or bias.dtype == x.dtype:
        return module(x)
    return torch.func.functional_call(module, {"bias": bias.to(x.dtype)}, (x,))


def storage(module: nn.Module) -> dict[str, torch.Tensor]:
    """The packed codes and scales as stored (4-bit: codes, absmax and, with double
    quantization, the nested absmax; 8-bit: codes and row scales)."""
    if not is_4bit(module):
        return {"codes": module.weight.data, "row_scales": _int8_scales(module)}
    state = module.weight.quant_state
    if is_packed_state(state):  # codes in their stored order
        return {"codes": unpacked_codes(module), "absmax": state.absmax}
    tensors = {"codes": module.weight.data, "absmax": state.absmax}
    if state.nested:
        tensors["nested_absmax"] = state.state2.absmax
    return tensors


def requantize(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new layer of ``module``'s format (same quant type, double quantization, block size,
    compute dtype, storage dtype -- FSDP-QLoRA stores the codes as bf16; same bias) holding ``weight`` (out, in) quantized afresh. A 4-bit one has
    bitsandbytes' eval-mode CPU repacking off (``loading.keep_4bit_storage``), as every layer
    lorakit loads: its first eval forward would otherwise rewrite its bytes, compute other
    numbers than the reported error's and be refused by ``dequantized_weight``."""
    import bitsandbytes as bnb

    out_features, in_features = shape(module)
    has_bias = module.bias is not None
    if is_4bit(module):
        state, storage = module.weight.quant_state, module.weight.quant_storage
        new = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=module.compute_dtype,
            compress_statistics=bool(state.nested),
            quant_type=state.quant_type,
            quant_storage=storage,
        )
        new.weight = bnb.nn.Params4bit(
            weight.detach().to(state.dtype).cpu(),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=bool(state.nested),
            quant_type=state.quant_type,
            quant_storage=storage,
        )
        new.support_avx512bf16_for_cpu = False
    else:
        new = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=module.state.threshold,
        )
        new.weight = bnb.nn.Int8Params(
            weight.detach().to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False
        )
    if has_bias:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return new.to(module.weight.device)
