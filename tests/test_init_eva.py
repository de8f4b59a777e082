"""EVA (``init_lora_weights="eva"``, ``lorakit.eva``) against the real ``peft`` (the oracle) and
against an independent PCA of the layer inputs: ranks, directions, B = 0, training, files both
ways, merge/unmerge, ``lorakit inspect``, refusals."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit.eva import redistribute_ranks
from lorakit.io import load_adapter
from lorakit.io.summary import summarize_adapter
from tests import tiny_models
from tests.eva_oracle import TENSOR_BATCHES, run_peft_eva
from tests.eva_toys import toy_batches, toy_model

TOLERANCE = 1e-5


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_ranks_and_directions_match_peft(rho):
    fields = dict(r=2, lora_alpha=4, target_modules=["0", "2", "4"], init_lora_weights="eva")
    original, batches = toy_model(), toy_batches()
    ours = lorakit.get_peft_model(
        copy.deepcopy(original), lorakit.LoraConfig(**fields, eva_config=lorakit.EvaConfig(rho=rho))
    )
    ranks = lorakit.initialize_lora_eva_weights(ours, batches)
    theirs = run_peft_eva(copy.deepcopy(original), fields, batches, dict(rho=rho), **TENSOR_BATCHES)
    expected = {"0": 1, "2": 2, "4": 3} if rho == 2.0 else {"0": 2, "2": 2, "4": 2}
    assert ranks == expected
    ours_config, theirs_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert ours_config.rank_pattern == theirs_config.rank_pattern
    assert ours_config.alpha_pattern == theirs_config.alpha_pattern
    theirs_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    for key, value in ours.model.state_dict().items():
        if "lora_A" in key:
            similarity = torch.cosine_similarity(value, theirs_state[key]).abs()
            assert similarity.min() > 0.98, (key, similarity)  # PEFT's PCA is randomised
        if "lora_B" in key:
            assert not value.any()
    ids = batches[0]
    torch.testing.assert_close(ours(ids), original(ids), rtol=0, atol=0)


def _lm_batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (3, 10), generator=generator)
        labels = ids.clone()
        labels[:, :4] = -100  # the prompt: left out with use_label_mask
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # padding: always left out
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_components_are_the_principal_directions_of_the_counted_tokens():
    """rho = 1 keeps every rank: A must be the top-r principal directions of the q_proj inputs
    at the positions with attention_mask 1 and labels != -100, over all batches."""
    original, batches = tiny_models.llama(), _lm_batches()
    config = lorakit.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="eva",
        eva_config=lorakit.EvaConfig(rho=1.0, tau=1.0),  # tau = 1: read every batch
    )
    model = lorakit.inject(copy.deepcopy(original), config)
    lorakit.initialize_lora_eva_weights(model, batches)
    rows = []
    module = original.get_submodule("model.layers.1.self_attn.q_proj")
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0]))
    counted = []
    with torch.no_grad():
        for batch in batches:
            original(**batch)
            counted.append(rows[-1][(batch["attention_mask"] == 1) & (batch["labels"] != -100)])
    handle.remove()
    inputs = torch.cat(counted).double()
    _, _, right_t = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False)
    lora_A = model.get_submodule("model.layers.1.self_attn.q_proj").lora_A["default"].weight
    similarity = torch.cosine_similarity(lora_A.double(), right_t[:3]).abs()
    torch.testing.assert_close(similarity, torch.ones(3, dtype=torch.float64))


def _eva_llama(fields):
    model = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(**fields))
    lorakit.initialize_lora_eva_weights(model, _lm_batches())
    return model


EVA_FIELDS = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")


def test_trains_merges_and_round_trips_with_peft(tmp_path):
    model = _eva_llama(EVA_FIELDS)
    ids = tiny_models.input_ids()
    parameters = tiny_models.sgd_steps(model, ids, lr=0.1)
    assert parameters and all(p.requires_grad for p in parameters)
    trained = model(ids).logits.detach()
    layer = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_B["default"].weight.abs().max() > 0
    base = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits.detach(), trained, rtol=0, atol=TOLERANCE)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, base)
    model.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "eva"
    assert written["rank_pattern"] == model.peft_config["default"].rank_pattern
    theirs = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "ours")
    torch.testing.assert_close(theirs(ids).logits.detach(), trained, rtol=0, atol=TOLERANCE)
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_adapter(tiny_models.llama(), tmp_path / "theirs")
    torch.testing.assert_close(ours(ids).logits.detach(), trained, rtol=0, atol=TOLERANCE)
    summary = summarize_adapter(tmp_path / "ours")
    assert summary["init_lora_weights"] == "eva"
    assert sum(summary["ranks"].values()) == 4  # the 4 adapted modules, whatever their ranks


def test_rank_distribution_takes_the_largest_ratios():
    ratios = {
        "a": torch.tensor([0.9, 0.05, 0.03, 0.02]),
        "b": torch.tensor([0.4, 0.3, 0.2, 0.1]),
        "c": torch.tensor([0.04, 0.03, 0.02, 0.01]),
    }
    ranks = {"a": 2, "b": 2, "c": 2}
    assert redistribute_ranks(ratios, ranks, rho=2.0) == {"a": 2, "b": 4, "c": 0}
    assert redistribute_ranks(ratios, ranks, rho=1.0) == {"a": 2, "b": 2, "c": 2}


def test_a_layer_given_rank_zero_loses_its_adapter(monkeypatch):
    monkeypatch.setattr(
        lorakit.eva, "redistribute_ranks", lambda ratios, ranks, rho, **_: {"0": 3, "2": 0, "4": 1}
    )
    model = lorakit.inject(
        toy_model(),
        lorakit.LoraConfig(
            r=2, lora_alpha=4, target_modules=["0", "2", "4"], init_lora_weights="eva"
        ),
    )
    lorakit.initialize_lora_eva_weights(model, toy_batches(count=2))
    assert isinstance(model[2], nn.Linear)
    config = lorakit.adapter_configs(model)["default"]
    assert config.target_modules == ["0", "4"]
    assert config.rank_pattern == {"0": 3, "4": 1}
    assert config.alpha_pattern == {"0": 6.0, "4": 2.0}
    assert model[0].lora_A["default"].weight.shape == (3, 24)
    assert model[0].scalings["default"] == 2.0  # alpha r'/r over r': the scaling is kept


def test_refusals_name_the_problem():
    model = lorakit.inject(toy_model(), lorakit.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        lorakit.initialize_lora_eva_weights(model, toy_batches(count=1))
    with pytest.raises(ValueError, match=r"rho=0\.5"):
        lorakit.EvaConfig(rho=0.5)
    eva_model = lorakit.inject(
        toy_model(), lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights="eva")
    )
    with pytest.raises(ValueError, match="no batches"):
        lorakit.initialize_lora_eva_weights(eva_model, [])
