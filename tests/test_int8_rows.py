"""lorakit's weight-only int8 base (``lorakit.quantized.int8_rows``): its output against a
float64 reference on the dequantized weight, its quantization rule, its backward, and a model
loaded with ``quantization="int8-rows"`` under LoRA (the protocol, greedy decoding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import quantized
from lorakit.models import load_model
from lorakit.quantized.int8_rows import Int8RowsLinear, kernel_applies, quantize_linears
from tests import quantized_layers, tiny_models

BF16_EPS = 2.0**-8  # bfloat16's relative rounding (8 significant bits)


def reference_output(layer: Int8RowsLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W0^T + b`` in float64 with ``W0 = codes * scale`` (the kernel's activations are
    bfloat16: the reference rounds them the same way where the kernel runs)."""
    x64 = x.to(torch.bfloat16) if kernel_applies(x, layer.codes) else x
    weight = layer.codes.double() * layer.scale.double()[:, None]
    out = x64.double() @ weight.T
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize(("out_features", "in_features"), [(32, 64), (48, 16), (5, 7)])
def test_int8_rows_output_equals_a_float64_product_with_the_dequantized_weight(
    out_features, in_features
):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    layer = Int8RowsLinear.from_weight(linear.weight, linear.bias)
    x = torch.randn(3, 4, in_features)
    with torch.no_grad():
        got = layer(x)
    expected = reference_output(layer, x)
    assert got.shape == (3, 4, out_features) and got.dtype == torch.float32
    # the kernel rounds its result to bfloat16 (one rounding of each output) and sums in float32
    scale = expected.abs() + expected.abs().mean()
    if kernel_applies(x, layer.codes):
        assert ((got.double() - expected).abs() <= 2 * BF16_EPS * scale).all()
        assert not torch.equal(got.double(), expected)  # (the kernel path, not float64)
    else:  # the fallback: float32 F.linear on the same W0
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_quantizing_rounds_each_row_against_its_bfloat16_absmax_scale():
    torch.manual_seed(1)
    weight = torch.randn(16, 32)
    weight[3] = 0.0  # a zero row: scale 1, codes 0
    layer = Int8RowsLinear.from_weight(weight)
    scale = layer.scale.float()
    assert layer.codes.dtype == torch.int8 and layer.scale.dtype == torch.bfloat16
    assert layer.codes.abs().max() <= 127
    assert torch.equal(scale[3], torch.tensor(1.0)) and not layer.codes[3].any()
    rows = [i for i in range(16) if i != 3]
    expected_scale = (weight[rows].abs().amax(1) / 127).to(torch.bfloat16).float()
    assert torch.equal(scale[rows], expected_scale)
    error = (layer.dequantized() - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()  # round to nearest code
    assert torch.equal(quantized.dequantized_weight(layer), layer.dequantized())


def test_the_input_gradient_is_the_dequantized_weight_and_nothing_else_trains():
    torch.manual_seed(2)
    layer = Int8RowsLinear.from_weight(torch.randn(16, 32), torch.randn(16))
    x = torch.randn(5, 32, requires_grad=True)
    grad_output = torch.randn(5, 16)
    layer(x).backward(grad_output)
    torch.testing.assert_close(x.grad, grad_output @ layer.dequantized())
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantize_linears_replaces_every_linear_and_the_protocol_knows_them():
    model = tiny_models.llama()
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert quantize_linears(model) == len(linears) == 15  # 2 layers x 7, plus lm_head
    for name in linears:
        module = model.get_submodule(name)
        assert quantized.is_quantized(module) and quantized.describe(module) == "int8-rows"
    assert set(quantized.storage(model.lm_head)) == {"codes", "row_scales"}


def test_greedy_decoding_on_int8_rows_with_an_adapter_equals_the_models_own_generate():
    """LoRA layers wrap the int8 linears (QuantizedLoraLinear); lorakit generate's engine path
    gives the ids transformers' generate gives on that same model, and the logits stay close to
    the float model's."""
    assert 0 < quantized_layers.greedy_logit_error(quantize_linears) < 0.05


def test_load_model_int8_rows_quantizes_every_linear(model_dir):
    model, _ = load_model(model_dir, quantization="int8-rows", progress=False)
    formats = {quantized.describe(m) for m in model.modules() if quantized.is_quantized(m)}
    assert formats == {"int8-rows"}
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_lorakit_generate_on_int8_rows_prints_the_int8_models_greedy_text(model_dir, capsys):
    from lorakit import cli

    prompt = "hello there"
    options = ["--quantization", "int8-rows", "--raw", "--max-new-tokens", "6"]
    code = cli.main(["generate", prompt, "--model", str(model_dir), *options])
    assert code == 0
    model, tokenizer = load_model(model_dir, quantization="int8-rows", progress=False)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected.strip() and capsys.readouterr().out == expected + "\n"
