"""A 4-bit layer ``quantized.merge.requantize`` builds keeps its stored bytes in eval mode,
and its base's storage dtype.

bitsandbytes repacks a CPU ``Linear4bit``'s bytes in place on its first eval-mode, no-grad
forward (``support_avx512bf16_for_cpu``, on CPUs with AVX-512 BF16). lorakit switches that off
on every layer it loads or adapts, but the layer ``requantize`` returned kept it on: its first
eval forward rewrote the bytes, it then computed other numbers than the reported error's, and
``dequantized_weight`` (so merging, adapting, loading an adapter) refused it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lorakit import quantized
from lorakit.quantized import merge as quantized_merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_requantized_4bit_layer_computes_and_dequantizes_after_an_eval_forward(quant_type):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 128), requires_grad=False, quant_type=quant_type
    )
    layer = layer.to("cpu")  # quantizes it
    layer.support_avx512bf16_for_cpu = False  # as lorakit loads it
    weight = quantized.dequantized_weight(layer) + 0.01 * torch.randn(64, 128)
    new = quantized_merge.requantize(layer, weight).module
    stored = new.weight.data.clone()
    dequantized = quantized.dequantized_weight(new)
    probe = torch.randn(5, 128)
    with torch.no_grad():
        new.eval()
        first = new(probe)
        second = new(probe)
    assert torch.equal(new.weight.data, stored)  # the bytes are the ones quantized
    assert torch.equal(quantized.dequantized_weight(new), dequantized)
    torch.testing.assert_close(first, probe @ dequantized.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_a_requantized_4bit_layer_keeps_the_storage_dtype_of_its_base():
    """FSDP-QLoRA stores the codes as bf16 (``bnb_4bit_quant_storage``): the re-quantized layer
    did as uint8, (6144, 1) for (3072, 1), so it could not go back into such a model. PEFT's
    merge keeps it; the codes are the ones a uint8 layer holds, byte for byte."""
    torch.manual_seed(0)
    layers = {}
    for storage in (torch.uint8, torch.bfloat16):
        layer = bnb.nn.Linear4bit(128, 96, bias=False, quant_storage=storage)
        layer.weight = bnb.nn.Params4bit(
            torch.randn(96, 128), requires_grad=False, quant_storage=storage
        )
        layers[storage] = layer.to("cpu")
        layers[storage].support_avx512bf16_for_cpu = False
    weight = quantized.dequantized_weight(layers[torch.uint8]) + 0.01 * torch.randn(96, 128)
    new = {s: quantized_merge.requantize(layer, weight).module for s, layer in layers.items()}
    stored = new[torch.bfloat16].weight
    assert stored.dtype == torch.bfloat16 and stored.quant_storage == torch.bfloat16
    assert tuple(stored.shape) == (3072, 1)
    assert torch.equal(
        stored.data.view(torch.uint8).flatten(), new[torch.uint8].weight.data.flatten()
    )
    assert torch.equal(
        quantized.dequantized_weight(new[torch.bfloat16]),
        quantized.dequantized_weight(new[torch.uint8]),
    )
