"""The lean decode step (``lorakit.serve.lean_decode``) against the model's own forward.

Every check runs one decode step both ways from the same cache (rows of different lengths, so
left padding is masked) and compares the logits and the keys and values written, on Llama,
Mistral and Qwen2 (q/k/v biases), float32 and int8-rows bases, mixed and single adapters with
B != 0, and a model served without a bank (``lorakit generate``'s case).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lorakit
from lorakit.quantized import int4_groups, int8_rows
from lorakit.quantized.int8_rows import Int8RowsLinear
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve.engine import Engine
from lorakit.serve.kv import BatchedCache
from lorakit.serve.lean_decode import LeanDecoder, lean_decoder, unsupported_reason
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.siblings import fuse_bases
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTERS = {
    "all": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "qv": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
}
PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 2, 30, 17, 9]]
# GQA (8 heads, 4 KV heads); every projection a multiple of 64 outputs, so int4-groups fuses too
SIZES = tiny_models.DECODER_SIZES | dict(
    hidden_size=128, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4
)
QUANTIZE = {"int8-rows": int8_rows.quantize_linears, "int4-groups": int4_groups.quantize_linears}


def family_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**SIZES, sliding_window=None)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()  # q/k/v with biases
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.1)
    return model


def served_reference(family: str = "llama") -> nn.Module:
    """The model holding ``ADAPTERS`` with random non-zero factors."""
    reference = family_model(family)
    for name, spec in ADAPTERS.items():
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.1)
    return reference


def served(family: str, base: str):
    """(served model, bank holding ``ADAPTERS`` with random non-zero factors)."""
    reference = served_reference(family)
    model = family_model(family)
    if base in QUANTIZE:
        QUANTIZE[base](model)
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=4, capacity=2, page_rank=2)
    for name in ADAPTERS:
        bank.load_from_model(name, reference, name)
    return model, bank


def prefilled(model, bank, slots: list[int]) -> tuple[BatchedCache, torch.Tensor]:
    """A cache holding ``PROMPTS`` (one per slot) and each row's next token (B, 1)."""
    cache, last = BatchedCache(), []
    with torch.inference_mode():
        for prompt, slot in zip(PROMPTS, slots, strict=True):
            ids = torch.tensor([prompt])
            with routed(bank, torch.full(ids.shape, slot)):
                out = model(input_ids=ids, use_cache=True)
            cache.add(out.cache, len(prompt))
            last.append([int(out.logits[0, -1].argmax())])
    return cache, torch.tensor(last)


def both_steps(model, decoder, bank, slots):
    """(lean logits, own-forward logits, lean cache, own cache) after one step from one cache."""
    cache, last = prefilled(model, bank, slots)
    mask, positions = cache.step_inputs()
    theirs = copy.deepcopy(cache)
    with torch.inference_mode(), routed(bank, torch.tensor(slots)[:, None]):
        lean = decoder.step(last, mask, positions, cache.cache)
        own = model(
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            cache=theirs.cache,
            use_cache=True,
        ).logits[:, -1]
    return lean, own, cache, theirs


def assert_caches_equal(mine: BatchedCache, theirs: BatchedCache, atol: float) -> None:
    for a, b in zip(mine.cache.layers, theirs.cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=atol) and torch.allclose(
            a.values, b.values, atol=atol
        )
        assert a.keys.shape[-2] == max(map(len, PROMPTS)) + 1  # the new column was written


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("base", ["float32", "int8-rows", "int4-groups"])
@pytest.mark.parametrize("slots", [[0, 1, -1], [0, 0, 0]], ids=["mixed", "one"])
def test_a_step_equals_the_models_own_forward(family, base, slots):
    model, bank = served(family, base)
    decoder = LeanDecoder(model, fuse_siblings=True)
    assert decoder.fused  # q/k/v and gate/up each one product
    lean, own, mine, theirs = both_steps(model, decoder, bank, slots)
    atol = 1e-5 if base == "float32" else 2e-3  # quantized: bfloat16 activations in the kernels
    assert own.abs().max() > 0.1
    assert torch.allclose(lean, own, atol=atol), (lean - own).abs().max()
    assert_caches_equal(mine, theirs, atol)


@pytest.mark.parametrize("slots", [[2, 2, 2], [2, 0, -1]], ids=["one", "mixed"])
def test_a_dora_adapter_takes_the_per_layer_route_and_the_step_stays_right(slots):
    """A DoRA slot scales its rows' base output: the one-adapter sibling product declines it
    (``add_siblings`` -> False) and each layer's router call adds it."""
    model, bank = served("llama", "float32")
    reference = family_model("llama")
    dora = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    lorakit.inject(reference, dora, adapter_name="dora")
    tiny_models.randomize_adapters(reference, std=0.1)
    bank = AdapterBank(model, max_rank=4, capacity=3, page_rank=2)
    bank.load_from_model("all", served_reference(), "all")
    bank.load_from_model("qv", served_reference(), "qv")
    bank.load_from_model("dora", reference, "dora")
    decoder = LeanDecoder(model, fuse_siblings=True)
    lean, own, mine, theirs = both_steps(model, decoder, bank, slots)
    assert torch.allclose(lean, own, atol=1e-5), (lean - own).abs().max()
    assert_caches_equal(mine, theirs, 1e-5)


def test_the_adapters_change_the_step():
    """The equality above is not the base alone: with the adapters the logits move."""
    model, bank = served("llama", "float32")
    decoder = LeanDecoder(model, fuse_siblings=True)
    with_adapters, _, _, _ = both_steps(model, decoder, bank, [0, 1, 0])
    without, _, _, _ = both_steps(model, decoder, bank, [-1, -1, -1])
    assert (with_adapters - without).abs().max() > 1e-2


def test_fusing_makes_the_weights_views_and_keeps_the_models_own_forward():
    model, bank = served("llama", "float32")
    ids = tiny_models.input_ids(batch=2, length=6)
    with torch.inference_mode(), routed(bank, torch.zeros(ids.shape, dtype=torch.long)):
        before = model(ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    decoder = LeanDecoder(model, fuse_siblings=True)
    block = decoder.blocks[0]
    q_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q_weight.untyped_storage().data_ptr() == block.qkv.fused.weight.data_ptr()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
    with torch.inference_mode(), routed(bank, torch.zeros(ids.shape, dtype=torch.long)):
        assert torch.equal(model(ids).logits, before)


def test_a_rebound_weight_ends_the_fusion_of_its_group_and_the_step_stays_right():
    model, bank = served("llama", "float32")
    decoder = LeanDecoder(model, fuse_siblings=True)
    proj = model.model.layers[1].mlp.up_proj.base_layer
    proj.weight = nn.Parameter(torch.randn_like(proj.weight), requires_grad=False)
    assert not decoder.blocks[1].gate_up.intact() and decoder.blocks[1].qkv.intact()
    lean, own, _, _ = both_steps(model, decoder, bank, [0, 1, 0])
    assert torch.allclose(lean, own, atol=1e-5)


def test_a_replaced_base_module_ends_the_fusion_of_its_group():
    model, bank = served("llama", "float32")
    decoder = LeanDecoder(model, fuse_siblings=True)
    layer = model.model.layers[0].self_attn.k_proj
    replacement = nn.Linear(layer.base_layer.in_features, layer.base_layer.out_features, bias=False)
    layer.base_layer = replacement.requires_grad_(False)  # the old one's weight is unchanged
    assert not decoder.blocks[0].qkv.intact() and decoder.blocks[0].gate_up.intact()
    lean, own, _, _ = both_steps(model, decoder, bank, [0, 1, 0])
    assert torch.allclose(lean, own, atol=1e-5)


def test_a_model_without_a_bank_calls_its_lora_layers_itself():
    """``lorakit generate``: the model's own active adapter, no router, nothing fused."""
    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tiny_models.randomize_adapters(model, std=0.1)
    decoder = LeanDecoder(model, fuse_siblings=False)
    assert not decoder.fused
    cache, last = BatchedCache(), []
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            cache.add(out.cache, len(prompt))
            last.append([int(out.logits[0, -1].argmax())])
        last = torch.tensor(last)
        mask, positions = cache.step_inputs()
        theirs = copy.deepcopy(cache)
        lean = decoder.step(last, mask, positions, cache.cache)
        own = model(
            input_ids=last, attention_mask=mask, position_ids=positions, cache=theirs.cache
        ).logits[:, -1]
    assert torch.allclose(lean, own, atol=1e-5)


def test_a_bfloat16_model_rounds_as_transformers_does():
    model, bank = served("llama", "float32")
    model.to(torch.bfloat16)
    bank = AdapterBank(model, max_rank=4, capacity=2, page_rank=2, dtype=torch.bfloat16)
    reference = family_model("llama")
    lorakit.inject(reference, lorakit.LoraConfig(**ADAPTERS["all"]), adapter_name="all")
    tiny_models.randomize_adapters(reference, std=0.1)
    bank.load_from_model("all", reference.to(torch.bfloat16), "all")
    decoder = LeanDecoder(model, fuse_siblings=True)
    lean, own, _, _ = both_steps(model, decoder, bank, [0, 0, -1])
    assert lean.dtype == torch.bfloat16
    assert torch.allclose(lean.float(), own.float(), atol=3e-2)


def test_the_engine_decodes_with_it_and_generates_what_the_models_forward_does():
    def run(lean: bool) -> list[list[int]]:
        model, bank = served("qwen2", "int4-groups")
        engine = Engine(model, bank, max_batch=4, eos_token_ids=[], lean_decode=lean)
        assert (engine._lean is not None) == lean
        calls = []
        if lean:
            step = engine._lean.step
            engine._lean.step = lambda *a: calls.append(1) or step(*a)
        with engine:
            outputs = [
                engine.generate(prompt, adapter, SamplingParams(max_tokens=8))[0]
                for prompt, adapter in zip(PROMPTS, ["all", "qv", None], strict=True)
            ]
        assert len(calls) == (3 * 7 if lean else 0)  # every decode step after each prefill
        return outputs

    assert run(lean=True) == run(lean=False)


def test_other_models_keep_their_own_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "gpt2" in unsupported_reason(gpt2)
    assert lean_decoder(gpt2, fuse_siblings=True) is None
    windowed = MistralForCausalLM(MistralConfig(**tiny_models.DECODER_SIZES, sliding_window=16))
    assert "sliding window of 16" in unsupported_reason(windowed)
    with pytest.raises(ValueError, match="cannot run this model"):
        LeanDecoder(windowed, fuse_siblings=True)
    gelu = tiny_models.llama()
    gelu.config.hidden_act = "gelu"
    assert "gelu" in unsupported_reason(gelu)


def test_bases_fuse_only_when_alike():
    linear = [nn.Linear(8, 4), nn.Linear(8, 6)]
    fused = fuse_bases(linear)
    assert fused.weight.shape == (10, 8) and torch.equal(fused.bias[4:], linear[1].bias)
    assert fuse_bases([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)]) is None
    assert fuse_bases([nn.Linear(8, 4), nn.Linear(8, 4).double()]) is None
    int8 = Int8RowsLinear.from_weight(torch.randn(8, 16))
    assert fuse_bases([nn.Linear(16, 8), int8]) is None
    int4 = [int4_groups.Int4GroupsLinear.from_weight(torch.randn(n, 64)) for n in (64, 32, 96)]
    assert fuse_bases(int4[:2]) is not None  # a 32-row block may end the concatenation
    assert fuse_bases(int4[1:]) is None  # but not sit inside it
    hooked = nn.Linear(8, 4)
    hooked.register_forward_hook(lambda *a: None)
    assert fuse_bases([hooked, nn.Linear(8, 4)]) is None


def test_a_float32_bank_beside_a_bfloat16_base_adds_the_siblings_in_one_product(monkeypatch):
    """``lorakit serve --dtype bfloat16`` keeps the bank float32: the one-adapter route still
    adds q/k/v's and gate/up's adapters in one product each (x cast up once), and the step
    equals the model's own per-layer forward up to bfloat16 rounding."""
    from lorakit.serve.one_adapter import OneAdapterRouter, routed_one

    model = family_model("llama").to(torch.bfloat16)
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=4, capacity=2, page_rank=2)
    assert bank.dtype == torch.float32
    bank.load_from_model("all", served_reference(), "all")
    decoder = LeanDecoder(model, fuse_siblings=True)
    fused = []
    add_siblings = OneAdapterRouter.add_siblings
    monkeypatch.setattr(
        OneAdapterRouter, "add_siblings", lambda *a: fused.append(add_siblings(*a)) or fused[-1]
    )
    cache, last = prefilled(model, bank, [0, 0, 0])
    mask, positions = cache.step_inputs()
    theirs, spare = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.inference_mode():
        with routed_one(OneAdapterRouter(bank, 0)):
            lean = decoder.step(last, mask, positions, cache.cache)
        with routed(bank, torch.zeros(3, 1, dtype=torch.long)):
            own = model(
                input_ids=last, attention_mask=mask, position_ids=positions, cache=theirs.cache
            ).logits[:, -1]
        with routed(bank, torch.full((3, 1), -1)):  # no adapter on any row
            without = decoder.step(last, mask, positions, spare.cache)
    assert fused and all(fused)  # every q/k/v and gate/up group in one product
    assert lean.dtype == torch.bfloat16
    error = (lean.float() - own.float()).abs().max()
    assert error < 3e-2 < (own.float() - without.float()).abs().max()


def test_the_one_adapter_route_adds_in_the_banks_dtype_per_layer_and_for_siblings():
    """Beside a bfloat16 base a float32 bank's adapter is computed in float32 by the per-layer
    call and by the siblings' shared product alike (x cast up, one rounding into the output):
    every element within one bfloat16 rounding of the float64 value (the adapter cast down to
    bfloat16 rounded A, the rank-side product and B too)."""
    from lorakit.serve.one_adapter import OneAdapterRouter

    model = family_model("llama").to(torch.bfloat16)
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=4, capacity=2, page_rank=2)
    bank.load_from_model("all", served_reference(), "all")
    router = OneAdapterRouter(bank, 0)
    attention = model.model.layers[0].self_attn
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    x = torch.randn(5, SIZES["hidden_size"]).to(torch.bfloat16)
    widths = [layer.out_features for layer in layers]
    with torch.inference_mode():
        per_layer = torch.cat(
            [
                router(layer, x, torch.zeros(5, w, dtype=x.dtype))
                for layer, w in zip(layers, widths, strict=True)
            ],
            dim=1,
        )
        shared = torch.zeros(5, sum(widths), dtype=x.dtype)
        assert router.add_siblings(layers, widths, x, shared)
    exact = []
    for layer in layers:
        stack = bank.stack_for(layer)
        lora_A, lora_B_t = router.factors(stack)
        exact.append(x.double() @ lora_A.double().T @ lora_B_t.double() * stack.scaling_values[0])
    exact = torch.cat(exact, dim=1)
    one_rounding = exact.abs() * 2.0**-8 * 1.01 + 1e-6  # bfloat16's unit roundoff, per element
    assert ((per_layer.double() - exact).abs() <= one_rounding).all()
    assert ((shared.double() - exact).abs() <= one_rounding).all()
