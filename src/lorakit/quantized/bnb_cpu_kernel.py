"""bitsandbytes' packed CPU kernel for 4-bit layers, for inference only (opt-in).

On a CPU with AVX512-BF16, bitsandbytes runs an eval-mode, no-grad ``Linear4bit`` through a
fused kernel (``gemv_4bit``) after repacking the layer's stored bytes in place
(``packing_format_for_cpu``): the 4-bit codes are reordered in blocks of 32 output rows and the
block scales become bfloat16 (with double quantization, the nested scales are expanded first),
and the product runs in bfloat16. It is about 1.4x faster than dequantize + matmul at decode
and prefill on SmolLM2's shapes (docs/quantized.md), and it is what a PEFT model on such a CPU
runs by default. lorakit keeps it off (``loading.keep_4bit_storage``) because it changes the
stored scales and the numbers (2.8e-3 relative on a 1024 x 1024 NF4 layer): a repacked layer
cannot be merged exactly or trained.

``use_bnb_cpu_kernel(model)`` turns it on, deliberately, for a model that only generates: it
repacks every 4-bit layer now (adapted or not), after its adapters are injected or loaded. From
then on the LoRA layers run their base through that kernel (``bnb.base_forward``); training
through a repacked layer and ``merge`` / ``merge_and_unload`` are refused with an error saying
to load the model afresh. The codes themselves are only reordered, so the base fingerprint
(computed from the codes in their stored order, ``unpacked_codes``) is the same before and
after: adapters still load (``inject``, ``load_adapter``, a serving bank). ``state_dict()``
writes the layer as it was loaded and leaves it packed (``_keep_layout_on_save``).

Layout of the repacked codes (bitsandbytes 0.50, ``block_n = 32``), for codes ``c`` (N, K) of
an (N out, K in) layer stored two to a byte (``c[2i]`` in the high nibble of byte i): the packed
(N, K / 2) bytes hold, per group ``g = (n // 32) * (K / 2) + k // 2`` of 32 bytes, the 64 codes of
rows ``32 (n // 32) + r`` (r < 32) at columns ``k // 2 * 2 + t`` (t < 2) in the order
``e = 2 r + t``: code e < 32 in the low nibble of byte e, code e >= 32 in the high nibble of
byte e - 32.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.errors import UserError

__all__ = [
    "BLOCK_ROWS",
    "CPU_KERNEL_MARK",
    "is_packed",
    "is_packed_state",
    "unpacked_codes",
    "use_bnb_cpu_kernel",
]

BLOCK_ROWS = 32  # output rows per packed block (bitsandbytes' block_n)

# set on a Linear4bit that ``use_bnb_cpu_kernel`` repacked on purpose (``bnb.check`` accepts it;
# a layer bitsandbytes repacked unasked is refused)
CPU_KERNEL_MARK = "lorakit_bnb_cpu_kernel"


def is_packed_state(state) -> bool:
    """A 4-bit ``quant_state`` bitsandbytes repacked for its CPU kernel."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def is_packed(module: nn.Module) -> bool:
    """``module`` is a ``Linear4bit`` whose bytes bitsandbytes repacked for its CPU kernel
    (``packing_format_for_cpu``), on purpose (``use_bnb_cpu_kernel``) or unasked."""
    return is_packed_state(getattr(getattr(module, "weight", None), "quant_state", None))


def unpacked_codes(module: nn.Module) -> torch.Tensor:
    """The 4-bit codes of a repacked ``Linear4bit`` in their stored order, as before the repack:
    ``(N * K / 2, 1)`` bytes, ``c[2i] << 4 | c[2i + 1]``, in the original storage dtype (see the
    module docstring for the layout). The codes are only reordered by the repack, so this equals
    the bytes as loaded, bit for bit."""
    state = module.weight.quant_state
    rows, columns = (int(size) for size in state.shape)
    packed = module.weight.data.view(torch.uint8).reshape(rows // BLOCK_ROWS, columns // 2, 32)
    low_high = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (N/32, K/2, 64): e = 2 r + t
    codes = low_high.view(rows // BLOCK_ROWS, columns // 2, BLOCK_ROWS, 2)
    codes = codes.permute(0, 2, 1, 3).reshape(-1, 2)  # (N * K / 2, 2): row-major pairs
    stored = ((codes[:, 0] << 4) | codes[:, 1]).to(torch.uint8)  # (N * K / 2,)
    storage_dtype = getattr(state, "original_storage_type", None) or torch.uint8
    return stored.view(storage_dtype).reshape(-1, 1)  # (bytes / itemsize, 1), as loaded


def _repackable(module: nn.Module) -> bool:
    """The kernel's shapes: out features in blocks of 32 rows, each row whole scale blocks."""
    state = module.weight.quant_state
    rows, columns = (int(size) for size in state.shape)
    return rows % BLOCK_ROWS == 0 and columns % state.blocksize == 0


def use_bnb_cpu_kernel(model: nn.Module) -> int:
    """Repack every bitsandbytes ``Linear4bit`` of ``model`` (adapted or not) for bitsandbytes'
    CPU kernel, in place; returns how many. Inference only, and for good: see the module
    docstring. Call it after the model's adapters are injected or loaded.

    Raises ``UserError`` on a CPU without AVX512-BF16 (bitsandbytes has no such kernel there),
    on a model without 4-bit layers, and names the first layer the kernel cannot take (not on the
    CPU; out features not a multiple of 32, or in features not of whole scale blocks) before
    changing any."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        raise UserError(
            "the bitsandbytes CPU kernel runs 4-bit layers, and this model has none; load it "
            "with --quantization nf4 or fp4 (BitsAndBytesConfig(load_in_4bit=True))"
        )
    if not has_avx512bf16():
        raise UserError(
            "bitsandbytes' packed 4-bit kernel needs a CPU with AVX512-BF16, which this one "
            "lacks; run without it (the default dequantize + matmul path)"
        )
    for name, module in layers:
        if module.weight.device.type != "cpu":
            raise UserError(
                f"layer {name!r} is on {module.weight.device}: bitsandbytes' packed 4-bit kernel "
                "is its CPU kernel; run without it"
            )
        if not is_packed(module) and not _repackable(module):
            raise UserError(
                f"layer {name!r} has shape {tuple(module.weight.quant_state.shape)}: bitsandbytes' "
                f"CPU kernel needs out features divisible by {BLOCK_ROWS} and in features by the "
                f"scale block size {module.weight.quant_state.blocksize}; run without it"
            )
    for _, module in layers:
        if not is_packed(module):
            _repack(module)
        setattr(module, CPU_KERNEL_MARK, True)
    return len(layers)


def _repack(module: nn.Module) -> None:
    """Let bitsandbytes repack ``module`` through its own forward (eval mode, no grad, one row),
    keeping its training flag and its stored bias (that forward casts the bias in place); then
    ``_keep_layout_on_save``."""
    state = module.weight.quant_state
    loaded_state = copy.deepcopy(state)  # (the repack rewrites it in place)
    bias = None if module.bias is None else module.bias.data
    training = module.training
    module.support_avx512bf16_for_cpu = True
    module.eval()
    try:
        with torch.no_grad():
            dtype = module.compute_dtype or torch.float32
            module(torch.zeros(1, int(state.shape[1]), dtype=dtype))
    finally:
        module.train(training)
        if bias is not None:
            module.bias.data = bias
    if is_packed(module):
        _keep_layout_on_save(module, loaded_state)


def _keep_layout_on_save(module: nn.Module, loaded_state) -> None:
    """``state_dict()`` of a repacked layer writes what was loaded (the codes in their stored
    order, ``unpacked_codes``, and the scales as loaded) and leaves the layer packed:
    bitsandbytes' own save undoes the repack in place, and for a layer without double
    quantization its undo keeps the bfloat16 scales in the packed order, so the layer then
    computed 4e-2 off and looked unpacked (mergeable, with a wrong W0). ``load_state_dict``
    into a repacked layer is refused: load the weights before ``use_bnb_cpu_kernel``."""

    def save(destination, prefix, keep_vars):
        destination[prefix + "weight"] = unpacked_codes(module)
        if module.bias is not None:
            destination[prefix + "bias"] = module.bias if keep_vars else module.bias.detach()
        for key, value in loaded_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def load(state_dict, prefix, *args, **kwargs):
        raise UserError(
            f"cannot load weights into {prefix or 'a layer'!r}: it was repacked for "
            "bitsandbytes' CPU kernel (use_bnb_cpu_kernel); load the weights first, then call it"
        )

    module._save_to_state_dict = save  # (instance attributes: only this layer)
    module._load_from_state_dict = load
