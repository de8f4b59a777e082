"""Review fixes of the inits: EVA with a first batch that counts no token, on quantized layers,
on layers sharing an input with different ranks (PEFT's ``max_components``), on an
encoder-decoder model; converting with the wrong initial adapter; PiSSA/OLoRA/LoftQ on a
quantized base. Values against the real ``peft`` and float64 formulas."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
import lorakit.eva
from lorakit.errors import UserError
from lorakit.io import load_adapter, save_adapter
from lorakit.quantized.int8_rows import quantize_linears
from tests import tiny_models
from tests.eva_oracle import run_peft_eva

EVA_FIELDS = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")


def _lm_batches(count, batch_size, seed=4):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (batch_size, 16), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def _all_masked(batch):
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def _counting(monkeypatch):
    """Record the tokens ``collect_statistics`` counted per layer."""
    counts, collect = {}, lorakit.eva.collect_statistics

    def spy(*args, **kwargs):
        stats, leader = collect(*args, **kwargs)
        counts.update({name: count for name, (_, _, count) in stats.items()})
        return stats, leader

    monkeypatch.setattr(lorakit.eva, "collect_statistics", spy)
    return counts


def _lora_A(model):
    return {
        name: layer.lora_A["default"].weight.detach().clone()
        for name, layer in lorakit.state.lora_layers(model)
    }


# --------------------------------------------------- bug 1: a first batch that counts no token
def test_a_first_batch_counting_no_token_changes_no_rank(monkeypatch):
    """Batch size 1, the first example's labels all -100: every layer still gets its tokens
    and its adapter, with the ranks and A of the run without that batch (which equal PEFT's).
    Was: layer 1 frozen at 0 tokens, rank 0, its adapter deleted."""
    batches = _lm_batches(30, batch_size=1)
    without = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**EVA_FIELDS))
    expected = lorakit.initialize_lora_eva_weights(without, batches[1:])
    counts = _counting(monkeypatch)
    model = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**EVA_FIELDS))
    ranks = lorakit.initialize_lora_eva_weights(model, [_all_masked(batches[0]), *batches[1:]])
    assert ranks == expected
    assert len(counts) == 4 and min(counts.values()) > 0, counts
    assert all(rank > 0 for rank in ranks.values())
    for name, value in _lora_A(without.model).items():
        torch.testing.assert_close(_lora_A(model.model)[name], value, rtol=0, atol=1e-6)
    theirs = run_peft_eva(tiny_models.llama(), EVA_FIELDS, batches[1:])
    assert model.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert model.peft_config["default"].alpha_pattern == (
        theirs.peft_config["default"].alpha_pattern
    )


def test_layers_counting_fewer_than_two_tokens_are_named():
    batches = [_all_masked(batch) for batch in _lm_batches(3, batch_size=2)]
    model = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**EVA_FIELDS))
    with pytest.raises(
        ValueError, match=r"layers\.0\.self_attn\.q_proj'.*: 0 tokens counted.*use_label_mask"
    ):
        lorakit.initialize_lora_eva_weights(model, batches)
    assert "lora_A" in dict(model.model.model.layers[0].self_attn.q_proj.named_children())


# --------------------------------------------------------------- bug 2: quantized LoRA layers
def test_eva_sets_the_principal_directions_on_quantized_layers():
    """Every linear quantized (int8-rows): each A is the top principal directions of its layer's
    inputs (float64 PCA of every token; tau = 1 reads every batch). Was: 'no batches'."""
    model = tiny_models.llama()
    quantize_linears(model.model)
    batches = [{"input_ids": b["input_ids"]} for b in _lm_batches(3, batch_size=2)]
    inputs = {}
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: inputs.setdefault(n, []).append(args[0].flatten(0, 1))
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    config = lorakit.LoraConfig(**EVA_FIELDS, eva_config=lorakit.EvaConfig(rho=1.0, tau=1.0))
    lorakit.inject(model, config)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLoraLinear"
    ranks = lorakit.initialize_lora_eva_weights(model, batches)
    assert ranks == dict.fromkeys(names, 2)
    with torch.no_grad(), lorakit.disabled(model):
        base = model(**batches[0]).logits
    torch.testing.assert_close(model(**batches[0]).logits.detach(), base, rtol=0, atol=0)  # B = 0
    for name in names:
        rows = torch.cat(inputs[name]).double()
        _, _, right_t = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
        lora_A = model.get_submodule(name).lora_A["default"].weight.double()
        similarity = torch.cosine_similarity(lora_A, right_t[:2]).abs()
        torch.testing.assert_close(similarity, torch.ones(2, dtype=torch.float64))


def test_an_adapter_without_linear_layers_is_refused_clearly():
    fields = {**EVA_FIELDS, "target_modules": ["embed_tokens"]}
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**fields))
    with pytest.raises(ValueError, match=r"no linear layer EVA can initialise.*embed_tokens"):
        lorakit.initialize_lora_eva_weights(model, _lm_batches(2, batch_size=2))


# ------------------------------------------------ bug 4: shared inputs with different ranks
class _SharedInput(nn.Module):
    """``a`` and ``b`` read the very same tensor; ``c`` another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(24, 10), nn.Linear(24, 10), nn.Linear(24, 6)

    def forward(self, x):
        shared = x[:, :24].contiguous()
        return self.c(x[:, 24:].contiguous()) + self.a(shared)[:, :6] + self.b(shared)[:, :6]


def _shared_batches():
    generator = torch.Generator().manual_seed(1)
    mix = torch.linalg.qr(torch.randn(24, 24, generator=generator))[0]
    shared_scales = torch.tensor([10.0, 9, 8, 7, 6, 5] + [0.01] * 18)
    other_scales = torch.tensor([30.0] + [0.01] * 23)
    return [
        torch.cat(
            [
                (torch.randn(256, 24, generator=generator) * shared_scales) @ mix,
                (torch.randn(256, 24, generator=generator) * other_scales) @ mix,
            ],
            1,
        )
        for _ in range(20)
    ]


def test_layers_sharing_an_input_offer_the_largest_of_their_components_as_peft():
    fields = dict(
        r=2,
        lora_alpha=4,
        target_modules=["a", "b", "c"],
        init_lora_weights="eva",
        rank_pattern={"a": 1, "b": 4},
    )
    ours = lorakit.get_peft_model(
        _SharedInput(), lorakit.LoraConfig(**fields, eva_config=lorakit.EvaConfig(rho=2.0))
    )
    ranks = lorakit.initialize_lora_eva_weights(ours, _shared_batches())
    theirs = run_peft_eva(
        _SharedInput(),
        fields,
        _shared_batches(),
        dict(rho=2.0),
        forward_fn=lambda m, x: m(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
    )
    assert ranks == {"a": 3, "b": 3, "c": 1}  # was a: 2 (capped at round(1 * 2)), b: 4
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].alpha_pattern == (
        theirs.peft_config["default"].alpha_pattern
    )
    assert ours.peft_config["default"].alpha_pattern == {"a": 12.0, "b": 3.0, "c": 2.0}


def test_redistribution_with_a_shared_input_raises_the_smaller_offer():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.2]), "b": torch.tensor([0.5, 0.3, 0.2])}
    ranks = {"a": 1, "b": 3}
    assert lorakit.eva.redistribute_ranks(ratios, ranks, 1.0) == {"a": 1, "b": 3}
    shared = {"a": "a", "b": "a"}
    assert lorakit.eva.redistribute_ranks(ratios, ranks, 1.0, shared_input=shared) == {
        "a": 2,
        "b": 2,
    }


# -------------------------------------------------------------- bug 5: encoder-decoder masks
def _bart_batches():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
    )
    model = BartForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(3, 128, (2, 12), generator=generator),
            "attention_mask": torch.ones(2, 12, dtype=torch.long),
            "labels": torch.randint(3, 128, (2, 7), generator=generator),
        }
        for _ in range(3)
    ]
    return model, batches


def test_masks_of_another_sequence_name_the_layer_and_what_to_do():
    model, batches = _bart_batches()
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")
    lorakit.inject(model, config)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.q_proj.*use_label_mask"):
        lorakit.initialize_lora_eva_weights(model, batches)
    model, batches = _bart_batches()
    no_labels = config.replace(eva_config=lorakit.EvaConfig(use_label_mask=False))
    lorakit.inject(model, no_labels)
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.self_attn\.q_proj.*attention_mask"):
        lorakit.initialize_lora_eva_weights(model, batches)


# ------------------------------------------------ bug 3: the wrong initial adapter on save
def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_converting_with_another_runs_initial_adapter_is_refused(tmp_path):
    original, ids = tiny_models.llama(), tiny_models.input_ids()
    fields = dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_1"
    )
    torch.manual_seed(1)
    other = lorakit.inject(copy.deepcopy(original), lorakit.LoraConfig(**fields))
    save_adapter(other, tmp_path / "initial_other")
    torch.manual_seed(2)
    model = lorakit.inject(copy.deepcopy(original), lorakit.LoraConfig(**fields))
    save_adapter(model, tmp_path / "initial")
    tiny_models.randomize_adapters(model)
    trained = _logits(model, ids)
    with pytest.raises(UserError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*right aft"):
        save_adapter(model, tmp_path / "wrong", initial_adapter=tmp_path / "initial_other")
    assert not (tmp_path / "wrong").exists()
    save_adapter(model, tmp_path / "right", initial_adapter=tmp_path / "initial")
    ours = load_adapter(copy.deepcopy(original), tmp_path / "right")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "right")
    torch.testing.assert_close(_logits(ours, ids), trained, rtol=0, atol=1e-4)
    torch.testing.assert_close(_logits(theirs, ids), trained, rtol=0, atol=1e-4)


# ------------------------------------------------- bug 7: base-changing inits on a quantized base
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_base_changing_inits_on_a_quantized_base_say_to_use_the_float_model(init):
    model = tiny_models.llama()
    quantize_linears(model.model)
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*unquantized"):
        lorakit.inject(model, config)
