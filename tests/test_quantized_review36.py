"""Known defects of the quantized bases, fixed in session 36.

1. T5 under ``int8-rows`` / ``int4-groups``: ``T5DenseActDense.forward`` reads
   ``self.wo.weight.dtype``, and a quantized ``wo`` has no ``weight`` (an ``AttributeError`` at
   the first forward). transformers keeps ``wo`` float for bitsandbytes (T5's
   ``_keep_in_fp32_modules = ["wo"]``); lorakit's formats now do too, so T5 (and BART) load and
   run, each quantized layer within bfloat16 rounding of ``F.linear`` on its dequantized weight
   in float64.
2. Every linear named by ``_keep_in_fp32_modules`` / ``_keep_in_fp32_modules_strict`` stays an
   ``nn.Linear`` holding its original float weight (the names matched as transformers'
   ``should_convert_module`` matches them).
3. A torchao int8 weight-only layer under LoRA in a model accelerate offloaded: the forward
   raised (``Tensor on device meta``: torchao's base forward read the meta weight, bypassing
   the hook) and so did ``save_adapter`` (adapters made on the meta device). Both now give the
   non-offloaded model's values exactly; ``merge`` / ``merge_and_unload`` refuse it, naming the
   module, its format and the way out, and change nothing.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import cpu_offload
from safetensors import safe_open
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.quantizers.quantizers_utils import should_convert_module

import lorakit
from lorakit.errors import UserError
from lorakit.io.fingerprint import METADATA_KEY
from lorakit.models import load_model
from lorakit.quantized import int4_groups, int8_rows
from lorakit.quantized.loading import quantize_loaded
from lorakit.quantized.weight_only import WeightOnlyLinear
from tests import quantized_layers, tiny_models, tiny_tokenizer

VOCAB = 100
EOS = 2


def _t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A tiny T5 whose linears all take int4-groups (sizes multiples of 32)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        dropout_rate=0.0,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def _bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        dropout=0.0,
        eos_token_id=EOS,
    )
    return BartForConditionalGeneration(config).eval()


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = EOS
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


def _check_against_dequantized(model, float_model, inputs) -> None:
    """Each weight-only layer of ``model`` on its own inputs: within bfloat16 rounding of
    ``F.linear`` on its dequantized weight in float64 (the kernels round x and the output to
    bfloat16: error <= 2^-9 |x| |W0|^T + 2^-9 |y|, bounded here with 2^-8 each); and the logits
    close to those of ``float_model`` with those dequantized weights, run in float64."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)}
    seen = {}

    def record(name):
        def hook(module, args, out) -> None:
            seen.setdefault(name, (args, out))  # (the first call: a decoder layer runs once)

        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    with torch.no_grad():
        logits = model(**inputs).logits
    for handle in handles:
        handle.remove()
    assert layers and set(seen) == set(layers)
    for name, ((x,), y) in seen.items():
        w0, x = layers[name].dequantized().double(), x.double()
        bias = layers[name].bias
        want = F.linear(x, w0, None if bias is None else bias.double())
        bound = 2**-8 * (x.abs() @ w0.abs().T) + 2**-8 * want.abs() + 1e-12
        assert ((y.double() - want).abs() <= bound).all(), name
    reference = copy.deepcopy(float_model).double()
    for name, layer in layers.items():  # (a new Parameter: a tied head leaves the embedding)
        held = reference.get_submodule(name)
        held.weight = nn.Parameter(layer.dequantized().double(), requires_grad=False)
    with torch.no_grad():
        want = reference(**inputs).logits
    assert (logits.double() - want).abs().max() <= 8e-3 * want.abs().max()


def _assert_kept(model, original, names) -> None:
    for name in names:
        module = model.get_submodule(name)
        assert type(module) is nn.Linear, name
        assert torch.equal(module.weight, original.get_submodule(name).weight), name


# ---------------------------------------------------------------- 1. T5 and BART
@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
@pytest.mark.parametrize("build", [_t5, _bart])
def test_t5_and_bart_load_and_run_on_a_weight_only_base(build, quantization):
    float_model, model = build(), build()
    quantize_loaded(model, quantization, None)  # what load_model does after from_pretrained
    _check_against_dequantized(model, float_model, _seq2seq_inputs())
    kept = [name for name in _linear_names(float_model) if name.endswith(".wo")]
    _assert_kept(model, float_model, kept)  # T5's wo; BART keeps none
    assert bool(kept) == (build is _t5)


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_a_t5_classifier_loads_with_load_model(tmp_path, quantization):
    tokenizer = tiny_tokenizer.build()
    _t5().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, task="seq-cls", quantization=quantization, progress=False)
    float_model, _ = load_model(tmp_path, task="seq-cls", progress=False)
    float_model.classification_head = copy.deepcopy(model.classification_head)  # (new, random)
    ids = _seq2seq_inputs()["input_ids"]
    _check_against_dequantized(model, float_model, {"input_ids": ids})
    kept = [name for name in _linear_names(float_model) if name.endswith(".wo")]
    assert len(kept) == 4
    _assert_kept(model, float_model, kept)


# ---------------------------------------------------------------- 2. the classes' float layers
@pytest.mark.parametrize(
    "quantize_linears", [int8_rows.quantize_linears, int4_groups.quantize_linears]
)
def test_the_layers_a_class_keeps_in_float_stay_float(quantize_linears):
    original = tiny_models.llama(seed=0)
    model = copy.deepcopy(original)
    model._keep_in_fp32_modules = {"model.layers.1.self_attn"}  # from the start, to a boundary
    model._keep_in_fp32_modules_strict = {"up_proj.weight"}  # a parameter's name
    quantize_linears(model)
    kept = {
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.up_proj",
        *(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"),
    }
    transformers_kept = {  # the first list as transformers leaves it for bitsandbytes
        name
        for name in _linear_names(original)
        if not should_convert_module(name, ["model.layers.1.self_attn"])
    }
    assert transformers_kept <= kept
    assert set(_linear_names(model)) == kept
    _assert_kept(model, original, kept)


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_t5_keeps_the_layers_transformers_keeps_for_bitsandbytes(quantization):
    original = _t5()
    model = _t5()
    quantize_loaded(model, quantization, None)
    keep = list(original._keep_in_fp32_modules)
    want = {name for name in _linear_names(original) if not should_convert_module(name, keep)}
    assert want and set(_linear_names(model)) == want
    _assert_kept(model, original, want)


def test_a_model_whose_block_layers_are_all_kept_float_is_refused():
    model = tiny_models.llama(seed=0)
    model._keep_in_fp32_modules = {"model.layers"}
    with pytest.raises(UserError, match="no layer of this LlamaForCausalLM"):
        quantize_loaded(model, "int8-rows", None)
    assert not any(isinstance(m, WeightOnlyLinear) for m in model.modules())


# ---------------------------------------------------------------- 3. torchao, offloaded
TARGETS = ["q_proj", "v_proj"]


def _torchao_llama() -> LlamaForCausalLM:
    """The tiny Llama with biased attention, q_proj and v_proj torchao int8 weight-only."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(attention_bias=True)).eval()
    for layer in model.model.layers:
        for name in TARGETS:
            linear = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, quantized_layers.torchao_int8(linear))
    return model


def _config():
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


@pytest.fixture(scope="module")
def reference():
    model = lorakit.inject(_torchao_llama(), _config())
    tiny_models.randomize_adapters(model, seed=3)
    return model


def _factors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _offloaded(reference, order: str):
    model = _torchao_llama()
    if order == "offload then inject":
        cpu_offload(model, execution_device=torch.device("cpu"))
    lorakit.inject(model, _config())
    model.load_state_dict(_factors(reference), strict=False)
    if order == "inject then offload":
        cpu_offload(model, execution_device=torch.device("cpu"))
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


@pytest.mark.parametrize("order", ["offload then inject", "inject then offload"])
def test_an_offloaded_torchao_base_computes_as_not_offloaded(reference, order):
    model = _offloaded(reference, order)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.is_meta
    assert torch.equal(_logits(model), _logits(reference))
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.is_meta  # offloaded again


def test_an_offloaded_torchao_base_trains_as_not_offloaded(reference):
    model = _offloaded(reference, "offload then inject")
    grads = []
    for each in (model, reference):
        each.zero_grad()
        each(tiny_models.input_ids()).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in each.named_parameters() if "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=1e-6)
    reference.zero_grad()


def test_an_adapter_saved_from_an_offloaded_torchao_base_is_that_of_the_base(reference, tmp_path):
    model = _offloaded(reference, "offload then inject")
    lorakit.save_adapter(model, tmp_path / "offloaded")
    lorakit.save_adapter(reference, tmp_path / "plain")
    files = [tmp_path / kind / "adapter_model.safetensors" for kind in ("offloaded", "plain")]
    saved = []
    for path in files:
        with safe_open(path, "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            saved.append((tensors, json.loads(handle.metadata()[METADATA_KEY])))
    assert saved[0][0].keys() == saved[1][0].keys()
    assert all(torch.equal(saved[0][0][k], saved[1][0][k]) for k in saved[0][0])
    assert saved[0][1] == saved[1][1]  # the same fingerprint of the torchao codes and values
    plain = _torchao_llama()
    lorakit.load_adapter(plain, tmp_path / "offloaded")  # (a mismatch would raise)
    assert torch.equal(_logits(plain), _logits(reference))
    again = _torchao_llama()
    cpu_offload(again, execution_device=torch.device("cpu"))
    lorakit.load_adapter(again, tmp_path / "plain")
    assert torch.equal(_logits(again), _logits(reference))


@pytest.mark.parametrize("order", ["offload then inject", "inject then offload"])
def test_merging_an_offloaded_torchao_base_is_refused_with_the_way_out(reference, order):
    model = _offloaded(reference, order)
    want = _logits(reference)
    path = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=rf"module '{path}'") as caught:
        lorakit.merge(model)
    assert "load the base without offloading" in str(caught.value)
    with pytest.raises(ValueError, match=rf"module '{path}'") as caught:
        lorakit.merge_and_unload(model)
    message = str(caught.value)
    assert "torchao-int8-weight-only" in message and "without offloading" in message
    assert "Nothing was changed" in message
    lorakit.unmerge(model)  # (nothing merged: nothing to do)
    assert not any(layer.merged_adapters for _, layer in lorakit.state.lora_layers(model))
    assert torch.equal(_logits(model), want)
