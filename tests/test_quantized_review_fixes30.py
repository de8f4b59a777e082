"""Review fixes (session 30) on a quantized base.

1. The fused training node (``lorakit.fast.quantized``) computes the base's input gradient
   ``G dequant(W0)`` exactly as the backend's own backward does: bitsandbytes' ``MatMul4Bit`` in
   the layer's ``compute_dtype`` (a bfloat16 compute dtype under a float32 model gave a float32
   product before, 2e-3 relative off the plain path and 1e-4 off PEFT), ``MatMul8bitFp`` with
   ``CB * (SCB / 127)`` (2.4e-7 off before), the others in the gradient's dtype.
2. Merging a ``Linear4bit`` repacked for bitsandbytes' CPU kernel is refused naming the module,
   before any layer changes (the refusal named no module, and ``merge_and_unload`` could raise it
   after merging and unloading other layers).
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

import lorakit
from lorakit import fast
from lorakit.layers import QuantizedLoraLinear
from lorakit.quantized import UnsupportedQuantizedLayerError
from lorakit.quantized.bnb import CPU_KERNEL_MARK
from lorakit.quantized.bnb_cpu_kernel import use_bnb_cpu_kernel
from lorakit.quantized.int4_groups import Int4GroupsLinear
from lorakit.quantized.int8_rows import Int8RowsLinear
from lorakit.state import lora_layers
from tests import quantized_layers, tiny_models


# ----------------------------------------------------------------- 1. the base's input gradient
def _bnb_4bit(linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype) -> nn.Module:
    layer = quantized_layers.bnb_4bit(linear, quant_type, double_quant)
    layer.compute_dtype = compute_dtype
    return layer


FORMATS = (
    dict(quantized_layers.QUANTIZERS)
    | {
        f"bnb-{q}{dq}-bf16-compute": (
            lambda linear, q=q, dq=dq: _bnb_4bit(linear, q, bool(dq), torch.bfloat16)
        )
        for q in ("nf4", "fp4")
        for dq in ("", "-dq")
    }
    | {
        "int8-rows": lambda linear: Int8RowsLinear.from_weight(linear.weight, linear.bias),
        "int4-groups": lambda linear: Int4GroupsLinear.from_weight(linear.weight, linear.bias),
    }
)


def _adapted(base: nn.Module, b_std: float) -> nn.Sequential:
    """``base`` under a seeded r=4 adapter (B ~ N(0, b_std), or 0), in training mode."""
    model = nn.Sequential(base)
    torch.manual_seed(1)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    lorakit.inject(model, config)
    with torch.no_grad():
        lora_B = model[0].lora_B["default"].weight
        if b_std:
            lora_B.normal_(std=b_std)
        else:
            lora_B.zero_()
    return model.train()


def _fused_and_plain(model: nn.Sequential, x: torch.Tensor) -> tuple[tuple, tuple]:
    """(output, dL/dx, dL/dA, dL/dB) by the fused node and by the plain path."""
    leaf = x.clone().requires_grad_(True)
    assert type(model(leaf).grad_fn).__name__ == "FusedQuantizedLoraLinearBackward"
    fused = quantized_layers.output_and_gradients(model, x)
    with fast.plain_path():
        assert type(model(leaf).grad_fn).__name__ != "FusedQuantizedLoraLinearBackward"
        plain = quantized_layers.output_and_gradients(model, x)
    return fused, plain


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_the_fused_node_on_a_bf16_compute_4bit_layer_equals_the_plain_path(
    quant_type, double_quant
):
    """A float32 model whose ``Linear4bit`` computes in bfloat16: output, dL/dx, dL/dA, dL/dB
    of the fused node equal the plain path's (bitsandbytes' own backward) bit for bit."""
    base = _bnb_4bit(quantized_layers.float_linear(), quant_type, double_quant, torch.bfloat16)
    fused, plain = _fused_and_plain(_adapted(base, b_std=0.2), torch.randn(2, 5, 64))
    for what, got, expected in zip(("out", "dx", "dA", "dB"), fused, plain, strict=True):
        assert expected.abs().max() > 0
        assert torch.equal(got, expected), (what, (got - expected).abs().max().item())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_base_input_gradient_is_the_backends_own_for_every_format(name, x_dtype):
    """With B = 0 the rank-r term of dL/dx is exactly 0, so dL/dx is the base's input gradient
    alone: the fused node's equals the backend's own backward's (the plain path) bit for bit,
    for every format, float32 and bfloat16 activations (a float32 compute dtype under bfloat16
    activations is a float32 product, cast back), including bitsandbytes 8-bit's
    ``CB * (SCB / 127)``."""
    base = FORMATS[name](quantized_layers.float_linear(64, 64))
    fused, plain = _fused_and_plain(_adapted(base, b_std=0.0), torch.randn(2, 5, 64).to(x_dtype))
    assert plain[1].dtype == x_dtype and plain[1].abs().max() > 0
    assert torch.equal(fused[1], plain[1]), (fused[1] - plain[1]).abs().max().item()


# Adapted layers whose input no other adapted layer reads: with q/k/v (or gate/up) adapted, the
# plain path hands autograd two input-gradient terms per layer and the fused node one, so their
# sums round differently (1e-8 in float32), and a bfloat16 compute dtype can turn that into a
# different bfloat16 rounding of an upstream gradient (see docs/quantized.md).
UNSHARED_INPUTS = ["o_proj", "down_proj"]


def _bnb_llama(directory, quant_type: str, double_quant: bool):
    return tiny_models.bnb_4bit_from(directory, quant_type, double_quant, torch.bfloat16)


def _gradients(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(dL/d input embeddings, {adapter key: gradient}) of the language-model loss."""
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings, labels=ids).loss.backward()
    grads = {
        key.removeprefix("base_model.model."): p.grad
        for key, p in model.named_parameters()
        if p.requires_grad
    }
    return embeddings.grad, grads


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_gradients_on_a_bf16_compute_bnb_llama_equal_peft(tmp_path, quant_type, double_quant):
    """A tiny Llama loaded with ``BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16)``:
    lorakit's input-embedding and A/B gradients (fused node) equal PEFT's within 1e-6 (1e-4 and
    2e-5 before the fix)."""
    tiny_models.llama().save_pretrained(tmp_path)
    fields = dict(r=4, lora_alpha=8, target_modules=UNSHARED_INPUTS, init_lora_weights=False)
    ours = lorakit.inject(
        _bnb_llama(tmp_path, quant_type, double_quant), lorakit.LoraConfig(**fields)
    )
    tiny_models.randomize_adapters(ours, std=0.1)
    theirs = peft.get_peft_model(
        _bnb_llama(tmp_path, quant_type, double_quant), peft.LoraConfig(**fields)
    )
    values = {key: p for key, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for key, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(values[key.removeprefix("base_model.model.")])
    nodes = []
    for _, layer in lora_layers(ours):
        assert type(layer) is QuantizedLoraLinear
        assert layer.base_layer.compute_dtype == torch.bfloat16
        layer.register_forward_hook(lambda m, i, out: nodes.append(type(out.grad_fn).__name__))
    ids = tiny_models.input_ids()
    our_embedding_grad, our_grads = _gradients(ours, ids)
    their_embedding_grad, their_grads = _gradients(theirs, ids)
    assert set(nodes) == {"FusedQuantizedLoraLinearBackward"} and len(nodes) == 4
    assert our_embedding_grad.abs().max() > 0
    torch.testing.assert_close(our_embedding_grad, their_embedding_grad, rtol=0, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 8
    for key, grad in our_grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, their_grads[key], rtol=0, atol=1e-6)


# ----------------------------------------------------------------- 2. the merge refusal
def _use_cpu_kernel(model: nn.Module) -> None:
    """``use_bnb_cpu_kernel`` where the CPU has AVX512-BF16; elsewhere (bitsandbytes has no such
    kernel there) only the mark it leaves on each ``Linear4bit``, which is what a merge reads."""
    if has_avx512bf16():
        use_bnb_cpu_kernel(model)
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            setattr(module, CPU_KERNEL_MARK, True)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key


def test_merging_a_repacked_layer_is_refused_naming_it_and_changes_nothing(tmp_path):
    LlamaForCausalLM(tiny_models.llama_config(intermediate_size=128)).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_use_double_quant=True
            ),
            device_map="cpu",
            dtype=torch.float32,
        )
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lorakit.inject(model, config)
    _use_cpu_kernel(model.eval())
    before = _snapshot(model)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        logits = model(ids).logits
    named = r"module 'model\.layers\.0\.self_attn\.q_proj' \(Linear4bit\): .*cannot be read exactly"
    with pytest.raises(UnsupportedQuantizedLayerError, match=named):
        lorakit.merge(model)
    with pytest.raises(UnsupportedQuantizedLayerError, match=named):
        lorakit.merge_and_unload(model)
    _assert_unchanged(model, before)
    layers = dict(lora_layers(model))
    assert len(layers) == 4 and not any(layer.merged_adapters for layer in layers.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_merge_and_unload_refuses_an_unadapted_repacked_layer_before_merging_any():
    """The adapter is on a float layer; the repacked ``Linear4bit`` beside it has none. The
    refusal names it before the float layer is merged or unloaded (it came after before)."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    model = nn.Sequential()
    model.add_module("head", nn.Linear(128, 128))
    model.add_module("proj", layer.to("cpu"))
    config = lorakit.LoraConfig(r=4, target_modules=["head"], init_lora_weights=False)
    lorakit.inject(model, config)
    _use_cpu_kernel(model.eval())
    before = _snapshot(model)
    with pytest.raises(UnsupportedQuantizedLayerError, match=r"module 'proj' \(Linear4bit\)"):
        lorakit.merge_and_unload(model)
    _assert_unchanged(model, before)
    head = dict(lora_layers(model))["head"]
    assert model.head is head and not head.merged_adapters
