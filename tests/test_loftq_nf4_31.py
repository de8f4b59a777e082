"""LoftQ's 4-bit quantizer (``lorakit.quantized.round_trip``) against a plain-torch NF4
reference written here, at shapes whose row length is not a multiple of the block size 64.

bitsandbytes 0.50's CPU ``dequantize_4bit`` decodes a 2-D weight whose row length is a multiple
of 16 but not of 64 as if each row began a new block (its codes and absmax are right); a
(64, 96) ``down_proj`` came back 0.28 off in relative norm instead of NF4's 0.09, and LoftQ's
``Q`` did not quantize to itself. ``round_trip`` now works on the flattened weight."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnb_functional
import pytest
import torch

import lorakit
from lorakit.quantized.round_trip import round_trip
from tests import tiny_models

# The 16 NF4 values (QLoRA paper, appendix E; bitsandbytes' ``get_4bit_type("nf4")``), code 0..15.
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BLOCK = 64
# rows of 96 / 48 are multiples of 16, not of 64 (the misdecoded case); (10, 7) and (33, 70):
# out * in not a multiple of 64 either, so the last block is short
SHAPES = [(64, 96), (96, 64), (48, 128), (128, 48), (10, 7), (33, 70)]


def nf4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: blocks of 64 over the flattened float32 weight (the last one
    short), ``absmax[b] = max |W|`` over block ``b``, ``codes[i]`` the index of the NF4 value
    nearest ``W[i] / absmax[i // 64]``."""
    flat = weight.to(torch.float32).reshape(-1)
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % BLOCK)]).reshape(-1, BLOCK)
    absmax = padded.abs().amax(dim=1)
    codes = ((padded / absmax[:, None])[..., None] - NF4).abs().argmin(dim=-1)
    return codes.reshape(-1)[: flat.numel()], absmax


def nf4_decode(codes: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    """``NF4[codes[i]] * absmax[i // 64]``, reshaped to ``shape`` (float32)."""
    scales = absmax.to(torch.float32).repeat_interleave(BLOCK)[: codes.numel()]
    return (NF4[codes] * scales).reshape(shape)


def nf4_reference(weight: torch.Tensor) -> torch.Tensor:
    """NF4 quantize + dequantize of ``weight``, in float32, of its shape."""
    return nf4_decode(*nf4_codes(weight), weight.shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_equals_the_plain_nf4_reference(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    expected = nf4_reference(weight)
    # the reference is bitsandbytes' format: its stored codes (high nibble first) and absmax
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=BLOCK, compress_statistics=False, quant_type="nf4"
    )
    stored = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([stored >> 4, stored & 15], dim=1).reshape(-1)[: weight.numel()]
    torch.testing.assert_close(nf4_decode(codes, state.absmax, shape), expected, rtol=0, atol=0)

    result = round_trip(weight, 4)

    assert result.shape == weight.shape and result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert torch.equal(round_trip(result, 4), result)  # on the grid: quantizes to itself


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_of_a_half_precision_weight(dtype):
    torch.manual_seed(1)
    weight = (torch.randn(64, 96) * 0.05).to(dtype)

    result = round_trip(weight, 4)

    # bitsandbytes dequantizes into the weight's dtype, then round_trip casts to float32
    expected = nf4_reference(weight).to(dtype).to(torch.float32)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_loftq_quantized_base_is_nf4_of_w0_and_requantizes_to_itself():
    original = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="loftq",
        loftq_config=lorakit.LoftQConfig(loftq_bits=4, loftq_iter=1),
    )
    model = lorakit.inject(copy.deepcopy(original), config)
    for name, shape in [
        ("model.layers.0.self_attn.q_proj", (64, 64)),
        ("model.layers.0.mlp.down_proj", (64, 96)),
    ]:
        weight = original.get_submodule(name).weight.detach()
        layer = model.get_submodule(name)
        quantized = layer.base_layer.weight.detach()
        assert tuple(quantized.shape) == shape
        # one iteration: Q = NF4(W0)
        torch.testing.assert_close(quantized, nf4_reference(weight), rtol=0, atol=0)
        assert torch.equal(round_trip(quantized, 4), quantized)
        relative = (weight - quantized).norm() / weight.norm()
        assert relative < 0.1, f"{name}: ||W0 - Q|| / ||W0|| = {relative:.3f}"
        low_rank = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert (weight - quantized - low_rank).norm() < (weight - quantized).norm()
