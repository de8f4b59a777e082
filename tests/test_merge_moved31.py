"""A merged model converted while merged (``.to(dtype)``, ``.half()``, ``.to(device)``): what
merging kept aside (the original weight, a merged bias on B's original bias) is converted with
it (``Merging._apply``). Unmerging then gives what unmerging first and converting after gives,
bit for bit; a disabled forward reads the converted base; a further merge and
``merge_and_unload`` stay in the new dtype. The ``meta`` device stands in for an accelerator
(the same ``Module._apply`` path). Before the fix the kept tensors stayed float32 on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit.layers.base import LoraLayer
from lorakit.quantized.int8_rows import quantize_linears
from lorakit.state import lora_layers
from tests import tiny_models

DTYPES = [torch.bfloat16, torch.float64]
IDS = tiny_models.input_ids(length=10, vocab=64)


def _llama(**config) -> torch.nn.Module:
    """Tiny Llama with LoRA on attention, the MLP and the input embedding (float32)."""
    model = tiny_models.llama()
    spec = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    lorakit.inject(model, lorakit.LoraConfig(**(spec | config)))
    return model


def _gpt2(**config) -> torch.nn.Module:
    """Tiny GPT-2: LoRA on its Conv1D layers (c_attn, c_fc) and the token embedding."""
    model = tiny_models.gpt2()
    spec = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"]) | config
    lorakit.inject(model, lorakit.LoraConfig(**spec))
    return model


def _parameters() -> torch.nn.Module:
    """Tiny Llama with LoRA on a bare parameter (``LoraParameter``) and on q_proj."""
    model = tiny_models.llama()
    config = lorakit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["mlp.down_proj.weight"]
    )
    lorakit.inject(model, config)
    return model


BUILDERS = {
    "llama": _llama,
    "llama-dora": lambda: _llama(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2-conv1d": _gpt2,
    "gpt2-lora-bias": lambda: _gpt2(target_modules=["c_attn"], lora_bias=True),
    "parameter": _parameters,
}


def _adapted(kind: str, second: bool = False) -> torch.nn.Module:
    """The model with a random adapter "default" (and "b" on q_proj / c_attn when ``second``)."""
    model = BUILDERS[kind]()
    if second:
        lorakit.inject(
            model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=[_one(kind)]), "b"
        )
    tiny_models.randomize_adapters(model, std=0.05)
    return model


def _one(kind: str) -> str:
    return "c_attn" if kind.startswith("gpt2") else "q_proj"


def _two_adapters(kind: str) -> torch.nn.Module:
    """Adapters "default" and "b" on the same one target (q_proj / c_attn): every layer merged
    before a cast is merged again after it, from the converted original."""
    builder = {"llama": _llama, "gpt2-conv1d": _gpt2, "gpt2-lora-bias": _gpt2}[kind]
    extra = dict(lora_bias=True) if kind == "gpt2-lora-bias" else {}
    model = builder(target_modules=[_one(kind)], **extra)
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=[_one(kind)], **extra)
    lorakit.inject(model, config, "b")
    tiny_models.randomize_adapters(model, std=0.05)
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _assert_same_state(model, reference) -> None:
    """Every parameter and buffer equal in dtype, device and value, bit for bit."""
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype, key
        assert state[key].device == tensor.device, key
        if tensor.device.type != "meta":
            assert torch.equal(state[key], tensor), key


def _merged_layers(model) -> list[LoraLayer]:
    return [layer for _, layer in lora_layers(model) if layer.merged_adapters]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_unmerging_after_a_cast_equals_unmerging_first_then_casting(kind, dtype):
    model = _adapted(kind)
    twin = copy.deepcopy(model)
    lorakit.merge(model)
    model.to(dtype)
    lorakit.unmerge(model)
    lorakit.merge(twin)
    lorakit.unmerge(twin)
    twin.to(dtype)
    _assert_same_state(model, twin)
    assert torch.equal(_logits(model), _logits(twin))
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    for _ in range(2):  # merge / unmerge cycles in the new dtype stay exact
        lorakit.merge(model)
        lorakit.merge(twin)
        assert torch.equal(_logits(model), _logits(twin))
        lorakit.unmerge(model)
        lorakit.unmerge(twin)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gpt2-conv1d", "gpt2-lora-bias", "parameter"])
def test_the_original_is_the_float32_original_converted(kind, dtype):
    """The kept original weight after the cast is exactly ``W0.to(dtype)``."""
    model = _adapted(kind)
    originals = {id(layer): layer.live_weight().clone() for _, layer in lora_layers(model)}
    lorakit.merge(model)
    model.to(dtype)
    for layer in _merged_layers(model):
        state, original = layer.read_merge_state()
        assert original.dtype == dtype and state.weight.dtype == dtype
        assert torch.equal(original, originals[id(layer)].to(dtype))
        assert state.weight is layer.live_weight()  # the merged weight the base holds


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "llama-dora", "gpt2-conv1d", "gpt2-lora-bias"])
def test_a_disabled_forward_after_a_cast_is_the_converted_base(kind, dtype):
    model = _adapted(kind)
    base = copy.deepcopy(model)
    lorakit.unload(base)  # the very base modules, unchanged
    lorakit.merge(model)
    model.to(dtype)
    with lorakit.disabled(model):
        disabled = _logits(model)
    assert disabled.dtype == dtype
    assert torch.equal(disabled, _logits(base.to(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gpt2-conv1d", "gpt2-lora-bias"])
def test_merging_another_adapter_after_a_cast_merges_in_the_new_dtype(kind, dtype):
    """Merge "default", cast, merge "b": the weights of casting first and merging both (the
    sum over both from the converted original, rounded once to the new dtype)."""
    model = _two_adapters(kind)
    twin = copy.deepcopy(model)
    lorakit.merge(model, ["default"])
    model.to(dtype)
    lorakit.merge(model, ["b"])
    twin.to(dtype)
    lorakit.merge(twin, ["default", "b"])
    for layer in _merged_layers(model):
        assert layer.merged_adapters == ("default", "b")
        assert layer.live_weight().dtype == dtype
    _assert_same_state(model, twin)
    assert torch.equal(_logits(model), _logits(twin))
    lorakit.unmerge(model)
    lorakit.unmerge(twin)
    _assert_same_state(model, twin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gpt2-conv1d", "gpt2-lora-bias"])
def test_merge_and_unload_after_a_cast_gives_every_weight_the_new_dtype(kind, dtype):
    model = _two_adapters(kind)
    twin = copy.deepcopy(model)
    lorakit.merge(model, ["default"])
    model.to(dtype)
    plain = lorakit.merge_and_unload(model, ["default", "b"])
    twin.to(dtype)
    expected = lorakit.merge_and_unload(twin, ["default", "b"])
    assert {p.dtype for p in plain.parameters()} == {dtype}
    _assert_same_state(plain, expected)
    assert torch.equal(_logits(plain), _logits(expected))


@pytest.mark.parametrize("kind", ["llama", "gpt2-conv1d"])
def test_merge_and_unload_of_a_partly_merged_model_after_a_cast_is_all_bfloat16(kind):
    """Every target merged before the cast, "b" on one of them after: one dtype throughout."""
    model = _adapted(kind, second=True)
    lorakit.merge(model, ["default"])
    model.to(torch.bfloat16)
    plain = lorakit.merge_and_unload(model, ["default", "b"])
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert _logits(plain).dtype == torch.bfloat16


def test_half_and_float_round_trip_as_an_unmerged_model_does():
    """``.half()`` then ``.float()`` while merged: unmerging gives ``float32(float16(W0))``."""
    model = _adapted("llama")
    twin = copy.deepcopy(model)
    lorakit.merge(model)
    model.half().float()
    lorakit.unmerge(model)
    twin.half().float()
    _assert_same_state(model, twin)
    assert torch.equal(_logits(model), _logits(twin))


def test_a_tied_output_embedding_stays_tied_through_a_cast_and_unmerge():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model)
    lorakit.merge(model)
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    lorakit.unmerge(model)
    embedding = model.model.embed_tokens.base_layer
    assert embedding.weight is model.lm_head.weight
    assert embedding.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["llama", "llama-dora", "gpt2-conv1d", "gpt2-lora-bias"])
def test_a_move_while_merged_moves_what_merging_kept(kind):
    """``.to("meta")`` while merged: unmerge, a disabled forward and ``merge_and_unload`` find
    the base on the new device (a merge cannot run there: its finiteness check reads values)."""
    model = _adapted(kind)
    lorakit.merge(model)
    model.to("meta")
    for layer in _merged_layers(model):
        state, original = layer.read_merge_state()
        assert original.device.type == "meta" and state.weight.device.type == "meta"
        assert state.weight is layer.live_weight()  # the new Parameter the base now holds
    ids = IDS.to("meta")
    with lorakit.disabled(model):
        assert _logits(model, ids).device.type == "meta"
    twin = copy.deepcopy(model)
    lorakit.unmerge(model)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert _logits(model, ids).device.type == "meta"
    plain = lorakit.merge_and_unload(twin)
    assert {p.device.type for p in plain.parameters()} == {"meta"}


def test_a_quantized_base_s_merged_weight_moves_and_stays_float32():
    """A quantized base (lorakit's int8-rows) keeps its merged float32 W beside the untouched
    base: a cast keeps it float32 and bit-identical (as the quantized storage keeps its dtypes;
    the forward casts it to the input's dtype), a move takes it along."""
    model = tiny_models.llama()
    quantize_linears(model.model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model)
    lorakit.merge(model)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.read_merge_state()[0].weight.detach().clone()
    model.to(torch.bfloat16)
    weight = layer.read_merge_state()[0].weight
    assert weight.dtype == torch.float32 and torch.equal(weight, before)
    assert _logits(model).dtype == torch.bfloat16
    model.to("meta")
    state, _ = layer.read_merge_state()
    assert state.weight.device.type == "meta" and state.weight.dtype == torch.float32
    assert state.adapters == ("default",)
    lorakit.unmerge(model)
    assert not _merged_layers(model)
