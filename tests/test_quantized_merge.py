"""The honest merge into a quantized base (float32 dequant + delta, against a float64 reference),
and the explicit re-quantization with the error it adds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import functional, quantized
from lorakit.quantized import UnsupportedQuantizedLayerError
from lorakit.quantized.merge import float_linear, lora_delta, merged_weight, requantize
from tests import quantized_layers

FORMATS = sorted(quantized_layers.QUANTIZERS)


def _adapter(rank: int = 4, size: float = 0.05, seed: int = 1):
    """A (r, 64) and B (48, r) with B != 0, scaled so that |s B A| / |W| is about ``size``."""
    generator = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(rank, 64, generator=generator) / 8
    lora_B = torch.randn(48, rank, generator=generator) * size / 4
    return lora_A, lora_B, functional.scaling(rank, 8.0)


@pytest.mark.parametrize("name", FORMATS)
def test_merged_weight_is_dequantized_plus_delta_against_a_float64_reference(name):
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear())
    lora_A, lora_B, scale = _adapter()
    reference = quantized.dequantized_weight(layer).double() + scale * (
        lora_B.double() @ lora_A.double()
    )
    merged = merged_weight(layer, [lora_delta(lora_A, lora_B, scale)])
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), reference, rtol=0, atol=1e-6)
    assert (merged - quantized.dequantized_weight(layer)).abs().max() > 1e-3  # B != 0 counts


@pytest.mark.parametrize("name", FORMATS)
def test_the_float_merged_layer_matches_the_unmerged_quantized_output(name):
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear())
    lora_A, lora_B, scale = _adapter()
    x = torch.randn(4, 9, 64)
    unmerged = quantized.base_forward(layer, x) + functional.lora_forward(x, lora_A, lora_B, scale)
    reference = F.linear(
        x.double(),
        quantized.dequantized_weight(layer).double() + scale * lora_B.double() @ lora_A.double(),
        layer.bias.double(),
    )
    merged_layer = float_linear(
        layer, merged_weight(layer, [lora_delta(lora_A, lora_B, scale)]), torch.float32
    )
    merged = merged_layer(x)
    assert type(merged_layer) is torch.nn.Linear and not merged_layer.weight.requires_grad
    torch.testing.assert_close(merged.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, unmerged.detach(), rtol=1e-5, atol=1e-5)


def test_two_adapters_merge_as_their_sum():
    layer = quantized_layers.gguf(quantized_layers.float_linear(), "Q4_1")
    first, second = _adapter(seed=1), _adapter(rank=2, seed=2)
    merged = merged_weight(layer, [lora_delta(*first), lora_delta(*second)])
    expected = quantized.dequantized_weight(layer).double()
    for lora_A, lora_B, scale in (first, second):
        expected = expected + scale * lora_B.double() @ lora_A.double()
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=1e-6)


def test_a_non_finite_adapter_is_refused_naming_the_format():
    layer = quantized_layers.bnb_4bit(quantized_layers.float_linear())
    lora_A, lora_B, scale = _adapter()
    lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="bnb-nf4-dq"):
        merged_weight(layer, [lora_delta(lora_A, lora_B, scale)])


@pytest.mark.parametrize("name", FORMATS)
def test_requantize_reports_the_error_it_adds_and_leaves_the_base_unchanged(name):
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear())
    stored = {key: tensor.clone() for key, tensor in quantized.storage(layer).items()}
    lora_A, lora_B, scale = _adapter(size=0.05)
    weight = merged_weight(layer, [lora_delta(lora_A, lora_B, scale)])
    probe = torch.randn(32, 64)
    report = requantize(layer, weight, probe)
    assert report.format == name == quantized.describe(report.module)
    wanted = F.linear(probe, weight, layer.bias)
    got = quantized.base_forward(report.module, probe)
    assert report.relative_output_error == pytest.approx(
        float((got - wanted).norm() / wanted.norm()), rel=1e-4
    )
    four_bit = name.startswith(("bnb-nf4", "bnb-fp4", "gguf-Q4"))
    assert (0.01 if four_bit else 1e-4) < report.relative_output_error < 0.5
    assert 0 < report.relative_weight_error < 0.5
    for key, tensor in quantized.storage(layer).items():
        assert torch.equal(tensor, stored[key]), key


def test_requantize_refuses_a_float_layer():
    linear = quantized_layers.float_linear()
    with pytest.raises(UnsupportedQuantizedLayerError, match="nothing to re-quantize"):
        requantize(linear, linear.weight.detach())
