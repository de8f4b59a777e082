"""lorakit's 4-bit base (``lorakit.quantized.int4_groups``): its packing against torch's own
packer, its output against a float64 product with the dequantized weight, its quantization rule
(Q4_1's grid), its backward, and a model loaded with ``quantization="int4-groups"`` under LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit import quantized
from lorakit.models import load_model
from lorakit.quantized import int4_groups
from lorakit.quantized.int4_groups import Int4GroupsLinear, pack, quantize_linears, unpack
from tests import quantized_layers, tiny_models

BF16_EPS = 2.0**-8
SHAPES = [(32, 32), (64, 96), (96, 64), (160, 576), (576, 1536)]


@pytest.mark.skipif(
    not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"),
    reason="this torch has no CPU int4 packer",
)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_packing_is_torchs_own_and_unpacking_inverts_it(out_features, in_features):
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = pack(codes)
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(codes, 1))
    assert torch.equal(unpack(packed).to(torch.int32), codes)


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_output_equals_a_float64_product_with_the_dequantized_weight(out_features, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    layer = Int4GroupsLinear.from_weight(linear.weight, linear.bias)
    x = torch.randn(3, 2, in_features)
    with torch.no_grad():
        got = layer(x)
    bf16_x = x.to(torch.bfloat16).double() if int4_groups.HAS_KERNEL else x.double()
    expected = bf16_x @ layer.dequantized().double().T + linear.bias.double()
    assert got.shape == (3, 2, out_features) and got.dtype == torch.float32
    scale = expected.abs() + expected.abs().mean()
    assert ((got.double() - expected).abs() <= 2 * BF16_EPS * scale).all()


def test_quantizing_puts_each_group_on_its_own_16_step_grid():
    torch.manual_seed(1)
    weight = torch.randn(64, 96)
    weight[5, 32:64] = 0.25  # a constant group: scale 0, code 8, the offset its value
    layer = Int4GroupsLinear.from_weight(weight)
    codes = unpack(layer.packed).view(64, 3, 32)
    scale, offset = layer.scales_and_offsets.float().unbind(-1)  # (3, 64)
    assert codes.max() <= 15 and layer.scales_and_offsets.dtype == torch.bfloat16
    groups = weight.view(64, 3, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    expected_scale = ((high - low) / 15).to(torch.bfloat16).float()
    assert torch.equal(scale.T, expected_scale)
    assert torch.equal(offset.T, (low + 8 * expected_scale).to(torch.bfloat16).float())
    assert (codes[5, 1] == 8).all() and torch.equal(layer.dequantized()[5, 32:64], weight[5, 32:64])
    error = (layer.dequantized().view(64, 3, 32) - groups).abs()
    # half a step; 1e-6: float32 rounding of the codes' division and of ``dequantized``
    bound = scale.T[..., None] / 2 + 1e-6
    assert (error <= bound).all()
    assert torch.equal(quantized.dequantized_weight(layer), layer.dequantized())


def test_the_input_gradient_is_the_dequantized_weight_and_nothing_else_trains():
    torch.manual_seed(2)
    layer = Int4GroupsLinear.from_weight(torch.randn(32, 64), torch.randn(32))
    x = torch.randn(5, 64, requires_grad=True)
    grad_output = torch.randn(5, 32)
    layer(x).backward(grad_output)
    torch.testing.assert_close(x.grad, grad_output @ layer.dequantized())
    assert not any(p.requires_grad for p in layer.parameters())


def test_bad_shapes_are_refused_with_the_rule():
    with pytest.raises(ValueError, match="multiples of 32"):
        Int4GroupsLinear.from_weight(torch.randn(48, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        Int4GroupsLinear(torch.zeros(32, 16, dtype=torch.uint8), torch.zeros(2, 32, 2), None)


def test_quantize_linears_takes_the_layers_that_fit_and_the_output_layer_in_int8():
    model = tiny_models.llama()
    assert quantize_linears(model) == 15  # 2 layers x 7, and lm_head
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            assert quantized.describe(module) == "int4-groups"
    assert quantized.describe(model.lm_head) == "int8-rows"
    model = tiny_models.llama()
    model.model.layers[0].mlp.down_proj = nn.Linear(96, 48)  # 48 outputs: not a multiple of 32
    assert quantize_linears(model) == 14
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert set(quantized.storage(model.model.layers[0].mlp.up_proj)) == {
        "packed",
        "scales_and_offsets",
    }


def test_an_output_layer_of_any_size_takes_int8_rows_as_the_plan_counts_it():
    """A vocabulary that is not a multiple of 32 (GPT-2's 50257): int8 rows take any shape, so
    the output layer is quantized all the same, and the footprint is what is stored."""
    from lorakit.quantized.footprint import quantized_base

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(vocab_size=130)).eval()
    weight = model.lm_head.weight.detach().clone()
    planned = quantized_base(model, "int4-groups")
    assert quantize_linears(model) == 15  # 2 layers x 7, and lm_head
    assert quantized.describe(model.lm_head) == "int8-rows"
    assert quantized.shape(model.lm_head) == (130, 64)
    error = (quantized.dequantized_weight(model.lm_head) - weight).abs().max()
    assert 0 < error <= weight.abs().max() / 127  # int8 rows' rounding of this very weight
    layers = [m for m in model.modules() if quantized.is_quantized(m)]
    stored = sum(
        t.numel() * t.element_size() for m in layers for t in quantized.storage(m).values()
    )
    weights = sum(m.out_features * m.in_features for m in layers)
    assert planned == (weights, stored)


def test_greedy_decoding_on_int4_groups_with_an_adapter_equals_the_models_own_generate():
    assert 0 < quantized_layers.greedy_logit_error(quantize_linears) < 0.2


def test_load_model_int4_groups_quantizes_the_linears_that_fit(model_dir):
    model, _ = load_model(model_dir, quantization="int4-groups", progress=False)
    for module in model.modules():
        if type(module) is nn.Linear:  # left float: a size that is not a multiple of 32
            assert not int4_groups.fits(module.out_features, module.in_features)
    formats = {quantized.describe(m) for m in model.modules() if quantized.is_quantized(m)}
    assert formats == {"int4-groups", "int8-rows"}  # int8: the output layer
    assert quantized.describe(model.lm_head) == "int8-rows"


def test_training_on_it_takes_the_fused_node_and_equals_the_plain_formula():
    """An adapter trained on an int4-groups base (``lorakit.fast.quantized``): output, dL/dx,
    dL/dA and dL/dB equal the plain formula's on the same base, with B != 0."""
    from lorakit import fast

    torch.manual_seed(3)
    model = nn.Sequential(Int4GroupsLinear.from_weight(torch.randn(64, 96), torch.randn(64)))
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    lorakit.inject(model, config)
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_(std=0.2)
    model.train()
    x = torch.randn(2, 5, 96)
    assert type(model(x.requires_grad_()).grad_fn).__name__ == "FusedQuantizedLoraLinearBackward"
    fused = quantized_layers.output_and_gradients(model, x)
    with fast.plain_path():
        plain = quantized_layers.output_and_gradients(model, x)
    for got, expected in zip(fused, plain, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_merge_into_a_float_layer_is_the_dequantized_weight_plus_the_delta():
    """``merge_and_unload`` on an int4-groups base gives float layers holding
    ``W0 + s B A`` (float64 reference), whose outputs match the unmerged ones within the kernel's
    bfloat16 rounding."""
    model = tiny_models.llama()
    quantize_linears(model)
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    )
    tiny_models.randomize_adapters(model, std=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.dequantized().double()
    lora_A = layer.lora_A["default"].weight.double()
    lora_B = layer.lora_B["default"].weight.double()
    expected = base + layer.scalings["default"] * lora_B @ lora_A
    ids = tiny_models.input_ids()
    with torch.no_grad():
        unmerged = model(ids).logits
    merged = lorakit.merge_and_unload(model)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear
    torch.testing.assert_close(q_proj.weight.double(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        error = (merged(ids).logits - unmerged).abs().max() / unmerged.abs().max()
    assert error < 0.02
