"""lorakit.quantized: the protocol (dequantized weight, base forward, format name, storage) for
every supported format, and the refusal of quantized layers no backend knows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import quantized
from lorakit.errors import UserError
from lorakit.quantized import UnsupportedQuantizedLayerError
from tests import quantized_layers

FORMATS = sorted(quantized_layers.QUANTIZERS)
# max |dequant(W0) - W| / max |W|: what each format's rounding allows (4-bit codes: 16 levels)
ROUNDING = {"bnb-int8": 0.01, "torchao-int8-weight-only": 0.01, "gguf-Q8_0": 0.01}


def _quantized(name: str) -> tuple[nn.Linear, nn.Module]:
    linear = quantized_layers.float_linear()
    return linear, quantized_layers.QUANTIZERS[name](linear)


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_is_recognised_and_dequantizes_close_to_the_float_weight(name):
    linear, layer = _quantized(name)
    assert quantized.is_quantized(layer)
    assert quantized.describe(layer) == name
    assert quantized.shape(layer) == (48, 64)
    weight = quantized.dequantized_weight(layer)
    assert weight.dtype == torch.float32 and weight.shape == (48, 64)
    error = (weight - linear.weight).abs().max() / linear.weight.abs().max()
    assert 0 < error < ROUNDING.get(name, 0.2)


@pytest.mark.parametrize("name", FORMATS)
def test_base_forward_and_input_gradient_are_those_of_the_dequantized_weight(name):
    _, layer = _quantized(name)
    weight = quantized.dequantized_weight(layer)
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = quantized.base_forward(layer, x)
    expected = F.linear(x.detach(), weight, layer.bias.detach())
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    torch.testing.assert_close(x.grad, grad_output @ weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORMATS)
def test_forwards_in_any_mode_leave_the_stored_bytes_unchanged(name):
    _, layer = _quantized(name)
    before = {key: tensor.clone() for key, tensor in quantized.storage(layer).items()}
    x = torch.randn(3, 64)
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            quantized.base_forward(layer, x)
        quantized.base_forward(layer, x.clone().requires_grad_()).sum().backward()
    after = quantized.storage(layer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    assert not getattr(state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("training", [True, False])
def test_an_8bit_forward_in_another_dtype_never_changes_the_stored_bias(training):
    """bitsandbytes' Linear8bitLt.forward casts its bias to the input's dtype for good
    (``bias.data = bias.data.to(x.dtype)``): lorakit's base forward must not let it."""
    _, layer = _quantized("bnb-int8")
    _, twin = _quantized("bnb-int8")  # the same layer, run by bitsandbytes itself
    layer.train(training)
    twin.train(training)
    bias = layer.bias.detach().clone()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        # float32 input: exactly the module's own output, as before
        assert torch.equal(quantized.base_forward(layer, x), twin(x))
        out = quantized.base_forward(layer, x.bfloat16())
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 48)
    expected = F.linear(x.bfloat16().float(), quantized.dequantized_weight(layer), bias)
    error = ((out.float() - expected).norm() / expected.norm()).item()
    assert error < (1e-2 if training else 3e-2)  # eval: LLM.int8 quantizes x as well
    with torch.no_grad():
        assert torch.equal(quantized.base_forward(layer, x), twin(x))  # and still after it


def test_a_merge_after_a_bfloat16_forward_keeps_the_8bit_layers_float32_bias():
    import lorakit

    layer = quantized_layers.bnb_8bit(quantized_layers.float_linear())
    bias = layer.bias.detach().clone()
    model = nn.Sequential(layer)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["0"]))
    with torch.no_grad():
        model(torch.randn(2, 64, dtype=torch.bfloat16))
    assert torch.equal(model[0].base_layer.bias, bias)
    merged = lorakit.merge_and_unload(model)
    assert torch.equal(merged[0].bias, bias)


def test_a_4bit_layer_repacked_for_the_cpu_inference_kernel_is_refused():
    _, layer = _quantized("bnb-nf4-dq")
    layer.weight.quant_state.packing_format_for_cpu = True  # what bnb's eval forward sets
    with pytest.raises(UnsupportedQuantizedLayerError, match="repacked") as refused:
        quantized.dequantized_weight(layer)
    message = str(refused.value)
    # what to do, and it is true: each of these turns the repacking off on every Linear4bit
    assert "afresh" in message and "keep_4bit_storage(model)" in message
    assert "lorakit.inject" in message and "load_model" in message
    assert "add LoRA before running it" not in message


def test_a_4bit_layer_not_yet_quantized_is_refused():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 48)  # built but never moved to a device: no quant_state
    with pytest.raises(
        UnsupportedQuantizedLayerError, match=r"'model\.q_proj': .*not quantized yet"
    ):
        quantized.check_supported(layer, "model.q_proj")


class QLinear(nn.Linear):
    """Stands in for optimum-quanto's QLinear: an nn.Linear subclass whose forward quantizes."""


QLinear.__module__ = "optimum.quanto.nn.qlinear"


class _WrappedTensor(torch.Tensor):
    """A tensor subclass, as quantization libraries use for packed weights."""


def _int8_linear() -> nn.Linear:
    linear = nn.Linear(64, 48)
    linear.weight = nn.Parameter(torch.zeros(48, 64, dtype=torch.int8), requires_grad=False)
    return linear


def _subclass_weight_linear() -> nn.Linear:
    linear = nn.Linear(64, 48)
    linear.weight = nn.Parameter(linear.weight.detach().as_subclass(_WrappedTensor))
    return linear


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: QLinear(64, 48), "optimum.quanto.nn.qlinear.QLinear"),
        (_int8_linear, "torch.int8"),
        (_subclass_weight_linear, "_WrappedTensor"),
    ],
)
def test_unknown_quantized_layers_are_refused_by_name_not_treated_as_linear(make, reason):
    module = make()
    assert not quantized.is_quantized(module)
    with pytest.raises(UnsupportedQuantizedLayerError, match=reason) as raised:
        quantized.check_supported(module, "model.layers.0.q_proj")
    assert "'model.layers.0.q_proj'" in str(raised.value)
    assert isinstance(raised.value, UserError)
    with pytest.raises(UnsupportedQuantizedLayerError):
        quantized.dequantized_weight(module)


def test_plain_float_layers_pass_the_check_and_are_not_quantized():
    for module in (nn.Linear(4, 3), nn.Embedding(5, 4), nn.Linear(4, 3).to(torch.bfloat16)):
        quantized.check_supported(module, "m")
        assert quantized.backend_for(module) is None
        assert quantized.looks_quantized(module) is None


def test_torchao_int8_that_also_quantizes_activations_is_refused():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    layer = nn.Sequential(nn.Linear(64, 48))
    quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedQuantizedLayerError, match="quantizes activations"):
        quantized.check_supported(layer[0], "model.fc")


@pytest.mark.slow  # a fresh interpreter importing torch
def test_importing_and_checking_plain_layers_imports_no_quantization_library():
    code = (
        "import sys, torch; from lorakit import quantized;"
        "quantized.check_supported(torch.nn.Linear(2, 2), 'm');"
        "print(sorted(m for m in ('bitsandbytes', 'torchao', 'gguf') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
