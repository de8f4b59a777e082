"""The fused training node on a quantized base (``lorakit.fast.quantized``): taken when one
adapter trains, equal to the plain formula without dropout, and with dropout equal to the float
fast path on the dequantized weights drawing the same masks; nothing full-size kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import fast
from tests import quantized_layers

FORMATS = sorted(quantized_layers.QUANTIZERS)


def _layers(name: str, dropout: float) -> tuple[nn.Sequential, nn.Sequential]:
    """(a quantized 48 x 64 layer with a random r=4 adapter, its dequantized float twin with the
    same adapter)."""
    model = nn.Sequential(quantized_layers.QUANTIZERS[name](quantized_layers.float_linear()))
    twin = quantized_layers.dequantized_twin(model)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], init_lora_weights=False
    )
    for each in (model, twin):
        torch.manual_seed(1)
        lorakit.inject(each, config)
        with torch.no_grad():
            each[0].lora_B["default"].weight.normal_(std=0.2)  # non-zero B
        each.train()
    return model, twin


@pytest.mark.parametrize("name", FORMATS)
def test_the_fused_node_runs_and_equals_the_plain_formula(name):
    model, _ = _layers(name, dropout=0.0)
    x = torch.randn(2, 5, 64)
    x_leaf = x.clone().requires_grad_(True)
    assert type(model(x_leaf).grad_fn).__name__ == "FusedQuantizedLoraLinearBackward"
    fused = quantized_layers.output_and_gradients(model, x)
    with fast.plain_path():
        assert type(model(x_leaf).grad_fn).__name__ != "FusedQuantizedLoraLinearBackward"
        plain = quantized_layers.output_and_gradients(model, x)
    for got, expected in zip(fused, plain, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["bnb-nf4-dq", "bnb-int8", "gguf-Q4_1", "torchao-int8-weight-only"]
)
@pytest.mark.parametrize("dropout", [0.05, 0.3])
def test_with_dropout_it_draws_the_float_fast_paths_masks(name, dropout):
    """Same seed, same masks: the quantized node and the float fast node on the dequantized
    weights give the same output and gradients (so a run on a quantized base draws the
    dropout its float model would)."""
    model, twin = _layers(name, dropout)
    x = torch.randn(3, 7, 64)
    for seed in (0, 1):
        quantized_run, float_run = (
            quantized_layers.output_and_gradients(model, x, seed),
            quantized_layers.output_and_gradients(twin, x, seed),
        )
        for got, expected in zip(quantized_run, float_run, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    other_seed = quantized_layers.output_and_gradients(model, x, 2)[0]
    assert not torch.equal(
        other_seed, quantized_layers.output_and_gradients(model, x, 0)[0]
    )  # the dropout is on


def test_inference_and_several_adapters_take_the_plain_formula():
    model, _ = _layers("gguf-Q4_1", dropout=0.0)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]), adapter_name="other")
    x = torch.randn(4, 64, requires_grad=True)
    with torch.no_grad():
        assert model(x).grad_fn is None
    layer = model[0]
    layer.active_adapters = ("default", "other")
    for name in layer.active_adapters:
        layer.lora_A[name].weight.requires_grad_(True)
    assert type(model(x).grad_fn).__name__ != "FusedQuantizedLoraLinearBackward"
