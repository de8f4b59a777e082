"""``round_trip``: a weight quantized and dequantized as bitsandbytes would store it, NF4 in
blocks of 64 or LLM.int8 rows (LoftQ's quantizer, ``lorakit.init_factors``), computed with
bitsandbytes' own functions, on the flattened weight where its CPU decoder misreads a 2-D one.
"""

from __future__ import annotations

import torch

__all__ = ["round_trip"]


def round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(weight))`` (out, in), float32, as a bitsandbytes layer would store
    ``weight``: 4 bits NF4 in blocks of 64 without double quantization, or 8 bits row-wise
    absmax of the float16 weight (what ``Params4bit`` / ``Int8Params`` do; LoftQ's quantizer).

    4 bits (``_nf4_round_trip``): ``W[i] -> NF4[q_i] * absmax[i // 64]`` over the flattened
    weight, ``absmax[b]`` the largest ``|W|`` of block ``b`` and ``q_i`` the nearest NF4 code
    of ``W[i] / absmax[i // 64]`` (the layout ``quantize_4bit`` writes); these numbers quantize
    to themselves again."""
    import bitsandbytes.functional as bnb_functional

    with torch.no_grad():
        if bits == 4:
            return _nf4_round_trip(weight)
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
        return bnb_functional.int8_vectorwise_dequant(codes, scales).to(torch.float32)


def _nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """NF4 (blocks of 64, no double quantization) ``dequantize(quantize(weight))`` in float32,
    of ``weight``'s shape, computed on the weight flattened to one row (1, out * in).

    Why flattened: bitsandbytes' blocks run over the flattened weight (a block may straddle two
    rows), and its codes and absmax are the same for a 2-D or a flattened call, but its CPU
    ``dequantize_4bit`` (0.50, native kernel) decodes a 2-D (m, n) weight whose row length n is
    a multiple of 16 but not of 64 (e.g. 48, 96) with the scale of block ``i * (n // 64) +
    j // 64`` for element (i, j) instead of ``(i * n + j) // 64``: a (64, 96) weight came back
    0.28 off in relative norm instead of NF4's 0.09, and did not quantize to itself. With one
    row (i = 0) the two indices agree."""
    import bitsandbytes.functional as bnb_functional

    codes, state = bnb_functional.quantize_4bit(
        weight.reshape(1, -1).contiguous(),
        blocksize=64,
        compress_statistics=False,
        quant_type="nf4",
    )
    flat = bnb_functional.dequantize_4bit(codes, state)
    return flat.reshape(weight.shape).to(torch.float32)
