"""LoRA on a quantized frozen base, end to end on the tiny Llama: inject, forward and gradients
against a float twin holding the dequantized weights, merge/unmerge that never touch the
quantized bytes, merge_and_unload to a plain float model, save/load with the base fingerprint,
and the refusal of an unknown quantized layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import quantized
from lorakit.errors import BaseModelMismatchError
from lorakit.io import load_adapter, save_adapter
from lorakit.layers import LoraLayer, QuantizedLoraLinear
from lorakit.quantized import UnsupportedQuantizedLayerError
from lorakit.state import lora_layers
from tests import quantized_layers, tiny_models

FORMATS = sorted(quantized_layers.QUANTIZERS)
# Every quantized layer is adapted, and outputs are compared in training mode (no dropout is
# configured): in eval mode bitsandbytes computes differently from x W0^T where it runs its own
# layers: Linear8bitLt quantizes the activations too (LLM.int8 inference), and a Linear4bit it
# runs itself without gradients on an AVX512-BF16 CPU is repacked for a bf16 kernel (see
# lorakit.quantized.bnb and docs/quantized.md, which measures both).
ALL_LINEAR = "all-linear"


def _config(**fields) -> lorakit.LoraConfig:
    fields = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_LINEAR,
        "init_lora_weights": False,
    } | fields
    return lorakit.LoraConfig(**fields)


def _pair(name: str, **fields) -> tuple[nn.Module, nn.Module]:
    """(quantized tiny Llama with a random adapter, its float twin with the same adapter)."""
    model = quantized_layers.quantize_linears(tiny_models.llama(), name)
    twin = quantized_layers.dequantized_twin(model)
    for each in (model, twin):
        lorakit.inject(each, _config(**fields))
        tiny_models.randomize_adapters(each, std=0.1)
    return model, twin


def _storage(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor.clone()
        for name, layer in lora_layers(model)
        for key, tensor in quantized.storage(layer.base_layer).items()
    }


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits in training mode (the tiny Llama and the configs here have no dropout)."""
    model.train()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", FORMATS)
def test_inject_wraps_the_quantized_layers_and_trains_only_the_adapter(name):
    model, _ = _pair(name)
    layers = dict(lora_layers(model))
    assert len(layers) == 14  # all 7 projections of both blocks ("all-linear" skips lm_head)
    assert all(type(layer) is QuantizedLoraLinear for layer in layers.values())
    assert {layer.base_format for layer in layers.values()} == {name}
    trainable = [key for key, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 28 and all(".lora_" in key for key in trainable)
    assert all(p.dtype == torch.float32 for key, p in model.named_parameters() if ".lora_" in key)


@pytest.mark.parametrize("name", FORMATS)
def test_outputs_and_lora_gradients_equal_the_dequantized_float_twin(name):
    model, twin = _pair(name)
    ids = tiny_models.input_ids()
    for each in (model, twin):
        each.train()
        each(ids, labels=ids).loss.backward()
    torch.testing.assert_close(_logits(model, ids), _logits(twin, ids), rtol=1e-5, atol=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    twin_grads = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == twin_grads.keys()
    for key, grad in grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, twin_grads[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", FORMATS)
def test_merge_unmerge_cycles_keep_the_quantized_bytes_and_the_outputs(name):
    model, _ = _pair(name)
    ids = tiny_models.input_ids()
    before_bytes, unmerged = _storage(model), _logits(model, ids)
    for _ in range(3):
        lorakit.merge(model)
        assert all(layer.merged_adapters == ("default",) for _, layer in lora_layers(model))
        torch.testing.assert_close(_logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(model)
        assert torch.equal(_logits(model, ids), unmerged)
    after_bytes = _storage(model)
    assert before_bytes.keys() == after_bytes.keys()
    assert all(torch.equal(before_bytes[key], after_bytes[key]) for key in before_bytes)


@pytest.mark.parametrize("name", FORMATS)
def test_merge_and_unload_returns_a_plain_float_model_with_the_unmerged_outputs(name):
    model, _ = _pair(name)
    ids = tiny_models.input_ids()
    unmerged = _logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) or quantized.is_quantized(m) for m in plain.modules())
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    torch.testing.assert_close(_logits(plain, ids), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-int8", "gguf-Q4_1"])
def test_layers_not_adapted_are_dequantized_too_by_merge_and_unload(name):
    model, _ = _pair(name, target_modules=["q_proj", "down_proj"])
    ids = tiny_models.input_ids()
    unmerged = _logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.model.layers[0].self_attn.k_proj) is nn.Linear  # was quantized, not adapted
    assert not any(quantized.is_quantized(m) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_in_bfloat16_when_asked():
    model, _ = _pair("bnb-nf4-dq", target_modules=["q_proj", "v_proj"])
    ids = tiny_models.input_ids()
    unmerged = _logits(model, ids)
    plain = lorakit.merge_and_unload(model, float_dtype=torch.bfloat16)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert plain.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16  # not adapted
    # the whole model is cast, so it runs: embeddings, norms and lm_head are bfloat16 too
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert _relative(_logits(plain, ids), unmerged) < 2e-2


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every float parameter outside the quantized layers in ``dtype`` (a bnb 4-bit layer
    computes in it too): a half-precision model with quantized linears."""
    for module in model.modules():
        if quantized.is_quantized(module):
            if getattr(module, "compute_dtype", None) is not None:
                module.compute_dtype = dtype
            continue
        for parameter in module.parameters(recurse=False):
            parameter.data = parameter.data.to(dtype)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name", ["bnb-nf4-dq", "bnb-int8", "gguf-Q4_1", "torchao-int8-weight-only"]
)
def test_merge_and_unload_keeps_a_half_precision_models_dtype_by_default(name, dtype):
    model = _in_dtype(quantized_layers.quantize_linears(tiny_models.llama(), name), dtype)
    lorakit.inject(model, _config(target_modules=["q_proj", "v_proj"]))
    tiny_models.randomize_adapters(model, std=0.1)
    ids = tiny_models.input_ids()
    unmerged = _logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert not any(quantized.is_quantized(m) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {dtype}  # adapted or not: the model's dtype
    assert plain.model.layers[0].self_attn.k_proj.weight.dtype == dtype  # not adapted
    assert _relative(_logits(plain, ids), unmerged) < 2e-2


@pytest.mark.parametrize("quantization", ["nf4", "int8-rows", "int4-groups"])
def test_merge_and_unload_of_a_model_loaded_in_bfloat16_runs_in_bfloat16(model_dir, quantization):
    from lorakit.models import load_model

    model, tokenizer = load_model(
        model_dir, dtype=torch.bfloat16, quantization=quantization, progress=False
    )
    lorakit.inject(model, _config(target_modules=["q_proj", "v_proj"]))
    tiny_models.randomize_adapters(model, std=0.1)
    ids = tiny_models.input_ids(vocab=len(tokenizer))
    unmerged = _logits(model, ids)
    plain = lorakit.merge_and_unload(model)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert _relative(_logits(plain, ids), unmerged) < 2e-2


def test_merge_and_unload_casts_the_whole_model_to_an_explicit_float_dtype():
    model = _in_dtype(
        quantized_layers.quantize_linears(tiny_models.llama(), "gguf-Q4_1"), torch.bfloat16
    )
    lorakit.inject(model, _config(target_modules=["q_proj", "v_proj"]))
    tiny_models.randomize_adapters(model, std=0.1)
    ids = tiny_models.input_ids()
    unmerged = _logits(model, ids)
    plain = lorakit.merge_and_unload(model, float_dtype=torch.float32)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert _relative(_logits(plain, ids), unmerged) < 2e-2


def test_a_float_dtype_that_is_not_a_float_type_is_refused_before_anything_changes():
    model, _ = _pair("gguf-Q4_1", target_modules=["q_proj"])
    layers_before = dict(lora_layers(model))
    with pytest.raises(ValueError, match=r"float_dtype=torch\.int8"):
        lorakit.merge_and_unload(model, float_dtype=torch.int8)
    assert dict(lora_layers(model)) == layers_before
    assert all(layer.merged_adapters == () for layer in layers_before.values())


def test_dropout_trains_on_a_quantized_base():
    model = quantized_layers.quantize_linears(tiny_models.llama(), "gguf-Q4_1")
    lorakit.inject(model, _config(lora_dropout=0.5))
    tiny_models.randomize_adapters(model)
    model.train()
    ids = tiny_models.input_ids()
    first, second = model(ids).logits, model(ids).logits
    assert not torch.equal(first, second)  # dropout on the adapter's input is on
    model(ids, labels=ids).loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "gguf-Q4_1"])
def test_dora_on_a_quantized_base_is_refused_and_nothing_changes(name):
    model = quantized_layers.quantize_linears(tiny_models.llama(), name)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\)"):
        lorakit.inject(model, _config(use_dora=True))
    assert dict(model.named_modules()) == before
    assert lorakit.adapter_configs(model) == {}


def test_an_unknown_quantized_layer_in_the_targets_is_refused_and_nothing_changes():
    model = tiny_models.llama()
    attention = model.model.layers[1].self_attn
    quanto_like = type("QLinear", (nn.Linear,), {"__module__": "optimum.quanto.nn.qlinear"})
    attention.v_proj = quanto_like(64, 32, bias=False)
    before = dict(model.named_modules())
    with pytest.raises(
        UnsupportedQuantizedLayerError, match=r"model\.layers\.1\.self_attn\.v_proj"
    ):
        lorakit.inject(model, _config())
    assert dict(model.named_modules()) == before
    assert lorakit.adapter_configs(model) == {}


@pytest.mark.parametrize("name", [*FORMATS, "int8-rows"])
def test_modules_to_save_naming_a_quantized_layer_is_refused_and_nothing_changes(name):
    """A full trained copy of quantized storage trains nothing (or bitsandbytes refuses
    gradients): inject refuses it first, naming the module, its format and what to do."""
    from lorakit.quantized import int8_rows

    model = tiny_models.llama()
    if name == "int8-rows":
        int8_rows.quantize_linears(model)
        saved, module = "lm_head", "lm_head"
    else:
        quantized_layers.quantize_linears(model, name, only=("o_proj",))
        saved, module = "o_proj", "model.layers.0.self_attn.o_proj"
    fmt = quantized.describe(model.get_submodule(module))
    modules_before = dict(model.named_modules())
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    config = _config(target_modules=["q_proj"], modules_to_save=[saved])
    with pytest.raises(ValueError, match=rf"'{module}'.*{fmt}.*target_modules.*unquantized"):
        lorakit.inject(model, config)
    assert dict(model.named_modules()) == modules_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    assert lorakit.adapter_configs(model) == {}
    assert not hasattr(model, "lorakit_state")


def test_modules_to_save_naming_a_block_that_holds_a_quantized_layer_is_refused():
    model = quantized_layers.quantize_linears(tiny_models.llama(), "gguf-Q4_1", only=("up_proj",))
    modules_before = dict(model.named_modules())
    config = _config(target_modules=["q_proj"], modules_to_save=["mlp"])
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*'up_proj'.*gguf-Q4_1"):
        lorakit.inject(model, config)
    assert dict(model.named_modules()) == modules_before
    # a float module beside the quantized ones is still saved in full, and trains
    lorakit.inject(model, _config(target_modules=["up_proj"], modules_to_save=["lm_head"]))
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert trained == ["lm_head.modules_to_save.default.weight"]


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-int8", "gguf-Q4_1"])
def test_save_and_load_on_the_same_quantized_base(tmp_path, name):
    model, _ = _pair(name)
    ids = tiny_models.input_ids()
    save_adapter(model, tmp_path)
    fresh = quantized_layers.quantize_linears(tiny_models.llama(), name).train()
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_an_adapter_from_a_quantized_base_is_refused_on_another_quantization_and_on_floats(
    tmp_path,
):
    model, _ = _pair("bnb-nf4-dq")
    save_adapter(model, tmp_path)
    for other, names in (("bnb-fp4-dq", "bnb-fp4-dq"), (None, "float32")):
        base = tiny_models.llama()
        if other is not None:
            quantized_layers.quantize_linears(base, other)
        with pytest.raises(BaseModelMismatchError, match=f"bnb-nf4-dq base, this base is {names}"):
            load_adapter(base, tmp_path)
        assert lorakit.adapter_configs(base) == {}


def test_named_adapters_choice_and_disabled_while_merged():
    model, twin = _pair("bnb-nf4-dq")
    for each in (model, twin):
        lorakit.inject(each, _config(r=2, target_modules=["q_proj", "v_proj"]), "second")
        tiny_models.randomize_adapters(each, seed=5, std=0.1)
    ids = tiny_models.input_ids()
    for names in (["default"], ["second"], ["default", "second"], []):
        with lorakit.use_adapters(model, names), lorakit.use_adapters(twin, names):
            torch.testing.assert_close(
                _logits(model, ids), _logits(twin, ids), rtol=1e-5, atol=1e-5
            )
    lorakit.set_active(model, ["default", "second"])
    lorakit.merge(model)
    with lorakit.disabled(model), lorakit.disabled(twin):
        torch.testing.assert_close(_logits(model, ids), _logits(twin, ids), rtol=1e-5, atol=1e-5)
    with lorakit.use_adapters(model, ["second"]), lorakit.use_adapters(twin, ["second"]):
        torch.testing.assert_close(_logits(model, ids), _logits(twin, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-fp4"])
def test_inference_without_gradients_never_repacks_an_adapted_4bit_base(name):
    model, twin = _pair(name)
    before = _storage(model)
    model.eval()
    with torch.no_grad():
        logits = model(tiny_models.input_ids()).logits
    after = _storage(model)
    assert all(torch.equal(before[key], after[key]) for key in before)
    for _, layer in lora_layers(model):
        assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(logits, _logits(twin, tiny_models.input_ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("load", ["inject", "load_adapter"])
def test_a_users_4bit_model_keeps_every_layers_bytes_in_eval_mode_adapted_or_not(tmp_path, load):
    """A model lorakit's loader did not build (as BitsAndBytesConfig leaves it): adding LoRA
    turns bitsandbytes' eval-mode repacking off on every Linear4bit, adapted or not, so a
    generation-style forward changes no stored byte, computes what training does, and
    merge_and_unload still works."""
    from transformers import LlamaForCausalLM

    def build() -> nn.Module:
        torch.manual_seed(0)  # sizes bitsandbytes' AVX512-BF16 kernel takes (it repacks them)
        model = LlamaForCausalLM(tiny_models.llama_config(intermediate_size=128))
        return quantized_layers.quantize_linears(model, "bnb-nf4-dq")

    model = build()
    if load == "inject":
        lorakit.inject(model, _config(target_modules=["q_proj", "v_proj"]))
        tiny_models.randomize_adapters(model, std=0.1)
    else:
        trained = build()
        lorakit.inject(trained, _config(target_modules=["q_proj", "v_proj"]))
        tiny_models.randomize_adapters(trained, std=0.1)
        save_adapter(trained, tmp_path)
        load_adapter(model, tmp_path)
    layers = {n: m for n, m in model.named_modules() if quantized.is_quantized(m)}
    assert len(layers) == 14 and "model.layers.0.self_attn.o_proj" in layers  # not adapted
    assert not any(m.support_avx512bf16_for_cpu for m in layers.values())
    before = {n: quantized.storage(m)["codes"].clone() for n, m in layers.items()}
    ids = tiny_models.input_ids()
    training = _logits(model, ids)
    model.eval()
    with torch.no_grad():
        inference = model(ids).logits
    for name, layer in layers.items():
        assert torch.equal(quantized.storage(layer)["codes"], before[name]), name
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), name
    torch.testing.assert_close(inference, training, rtol=1e-5, atol=1e-5)
    plain = lorakit.merge_and_unload(model)
    torch.testing.assert_close(_logits(plain, ids), training, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORMATS)
def test_the_serving_bank_routes_an_adapter_on_a_quantized_base_as_the_unmerged_layer(name):
    from lorakit.serve import AdapterBank, prepare_for_serving, routed

    model, _ = _pair(name)
    served = quantized_layers.quantize_linears(tiny_models.llama(), name)
    prepare_for_serving(served, ALL_LINEAR)
    bank = AdapterBank(served, max_rank=4, capacity=2)
    slot = bank.load_from_model("default", model)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model.train()(ids).logits  # training mode: see the note at FORMATS
        with routed(bank, torch.full(ids.shape, slot)):
            got = served.train()(ids).logits
        base = served(ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORMATS)
def test_training_saves_no_dequantized_weight_for_backward(name):
    """Autograd keeps the quantized storage (or nothing) for the base: no float (d, k) tensor."""
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear())
    model = nn.Sequential(layer)
    lorakit.inject(model, _config(target_modules=["0"]))
    model.train()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    dequantized = [  # (d, k) or its transpose, as F.linear saves it
        t
        for t in saved
        if tuple(t.shape) in ((48, 64), (64, 48))
        and t.is_floating_point()
        and type(t) is torch.Tensor
    ]
    assert dequantized == []
    out.sum().backward()
    assert model[0].lora_B["default"].weight.grad.abs().max() > 0


def test_merge_and_unload_refuses_a_repacked_layer_before_changing_anything():
    model, _ = _pair("bnb-nf4-dq", target_modules=["q_proj"])
    k_proj = model.model.layers[1].self_attn.k_proj
    k_proj.weight.quant_state.packing_format_for_cpu = True  # what bnb's eval forward sets
    layers_before = dict(lora_layers(model))
    with pytest.raises(
        UnsupportedQuantizedLayerError, match=r"'model\.layers\.1\.self_attn\.k_proj'"
    ):
        lorakit.merge_and_unload(model)
    assert dict(lora_layers(model)) == layers_before
    assert all(layer.merged_adapters == () for layer in layers_before.values())
    assert model.model.layers[1].self_attn.k_proj is k_proj


@pytest.mark.parametrize("name", ["gguf-Q4_1", "bnb-int8"])
def test_a_hook_on_a_quantized_base_keeps_its_output_under_no_grad(name) -> None:
    """These backends run the base module itself, so its forward hooks see (and may keep) its
    output: the LoRA branch must not be added into that tensor."""
    from tests.quantized_layers import QUANTIZERS, float_linear

    holder = torch.nn.Sequential(QUANTIZERS[name](float_linear()))
    lorakit.inject(holder, lorakit.LoraConfig(r=2, target_modules=["0"]))
    layer = holder[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    captured = []
    layer.base_layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base = layer.base_layer(x).clone()
        captured.clear()
        out = layer(x)
    torch.testing.assert_close(captured[0], base, rtol=0, atol=0)
    assert (out - base).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["bnb-nf4-dq", "gguf-Q4_1"])
def test_eval_forward_adds_each_adapter_in_place_as_the_float64_formula(name, dtype, monkeypatch):
    """Inference on a quantized base adds each adapter into the base output in place
    (``LoraLinear.add_adapter_``): two adapters, eval mode (their dropout off), an input that
    is not contiguous, activations in float32 or bfloat16 against float32 factors."""
    from lorakit import functional

    in_place_adds = []
    add = functional.add_lora_forward_
    monkeypatch.setattr(
        functional, "add_lora_forward_", lambda *args: in_place_adds.append(1) or add(*args)
    )
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear())
    model = nn.Sequential(layer)
    lorakit.inject(model, _config(r=4, target_modules=["0"], lora_dropout=0.3))
    lorakit.inject(model, _config(r=2, lora_alpha=6, target_modules=["0"]), "second")
    tiny_models.randomize_adapters(model, std=0.1)
    lorakit.set_active(model, ["default", "second"])
    x = torch.randn(5, 3, 64).transpose(0, 1).to(dtype)  # (3, 5, 64), not contiguous
    model.eval()
    with torch.no_grad():
        out = model(x)
    lora = model[0]
    expected = torch.nn.functional.linear(
        x.double(),
        quantized.dequantized_weight(lora.base_layer).double(),
        None if lora.base_layer.bias is None else lora.base_layer.bias.double(),
    )
    for adapter, scale in (("default", 2.0), ("second", 3.0)):
        lora_A = lora.lora_A[adapter].weight.double()
        lora_B = lora.lora_B[adapter].weight.double()
        expected += scale * (x.double() @ lora_A.T) @ lora_B.T
    assert out.dtype == dtype and out.shape == (3, 5, 48)
    assert len(in_place_adds) == 2  # both adapters took the three-op path
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
