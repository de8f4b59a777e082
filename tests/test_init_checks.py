"""Up-front refusals of the base-changing inits (PiSSA / OLoRA / LoftQ) and of wrongly typed
init settings, and ``inject``'s all-or-nothing promise when an init fails part-way."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit import init_factors
from tests import tiny_models

BASE_CHANGING = ["pissa", "pissa_niter_2", "olora", "loftq"]


def _unchanged(model, original) -> None:
    """``model`` is ``original`` again: no adapter state, the same module types, the same
    tensors bit for bit and the same logits."""
    assert not hasattr(model, "lorakit_state")
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    theirs = original.state_dict()
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    ids = tiny_models.input_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


# ----------------------------------------------------------------- bug 1: rank > min(d, k)
@pytest.mark.parametrize("init", BASE_CHANGING)
@pytest.mark.parametrize(
    "fields",
    [dict(r=40, lora_alpha=40), dict(r=2, lora_alpha=4, rank_pattern={"v_proj": 40})],
)
def test_rank_above_the_weights_smaller_side_is_refused_before_any_change(init, fields):
    """v_proj is 32 x 64 (GQA): rank 40 > min(d, k) = 32; q_proj (64 x 64) and down_proj
    (64 x 96) come first and used to be rewritten before the crash."""
    original = tiny_models.llama()
    model = copy.deepcopy(original)
    config = lorakit.LoraConfig(
        **fields, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init
    )
    with pytest.raises(ValueError, match=r"v_proj.*\(32, 64\).*rank 40.*rank_pattern") as error:
        lorakit.inject(model, config)
    assert "min(d, k) = 32" in str(error.value)
    _unchanged(model, original)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_equal_to_the_smaller_side_is_accepted_and_equals_peft(init):
    original = tiny_models.llama()
    fields = dict(r=2, lora_alpha=4, target_modules=["v_proj"], rank_pattern={"v_proj": 32})
    ours = lorakit.inject(
        copy.deepcopy(original), lorakit.LoraConfig(**fields, init_lora_weights=init)
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(**fields, init_lora_weights=init)
    )
    reference = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=2e-5, rtol=1e-4)


def _fail_on_call(monkeypatch, number: int) -> None:
    """Make the ``number``-th factorisation raise (as an SVD that does not converge would)."""
    real, calls = init_factors.factors_for, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise RuntimeError("linalg.svd: the algorithm failed to converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(init_factors, "factors_for", failing)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_a_failing_init_leaves_the_model_as_it_was(init, monkeypatch):
    original = tiny_models.llama()
    model = copy.deepcopy(original)
    _fail_on_call(monkeypatch, 3)  # after two layers' base weights were rewritten
    config = lorakit.LoraConfig(
        r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init
    )
    with pytest.raises(RuntimeError, match="failed to converge"):
        lorakit.inject(model, config)
    _unchanged(model, original)


def test_a_failing_init_keeps_the_adapters_already_there(monkeypatch):
    original = tiny_models.llama()
    model = lorakit.inject(
        copy.deepcopy(original),
        lorakit.LoraConfig(r=2, target_modules=["k_proj", "o_proj"], init_lora_weights=False),
        adapter_name="first",
    )  # (not on q/v: a base-changing init is refused where adapters already are)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    _fail_on_call(monkeypatch, 3)
    config = lorakit.LoraConfig(
        r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    )
    with pytest.raises(RuntimeError, match="failed to converge"):
        lorakit.inject(model, config, adapter_name="second")
    assert list(lorakit.adapter_configs(model)) == ["first"]
    assert [type(m) for m in model.modules()] == kinds
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ----------------------------------------------------------------- bug 4: shared base weights
def test_layer_replication_with_a_base_changing_init_is_refused_by_the_config():
    for init in BASE_CHANGING:
        with pytest.raises(ValueError, match=r"layer_replication.*share"):
            lorakit.LoraConfig(init_lora_weights=init, layer_replication=[[0, 2], [1, 2]])
    lorakit.LoraConfig(init_lora_weights=True, layer_replication=[[0, 2], [1, 2]])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_tied_weight_is_refused_before_any_change(init):
    """GPT-2's lm_head shares its weight with the input embedding: rewriting it in place
    would change the embedding's output too (PEFT does, silently)."""
    original = tiny_models.gpt2()
    assert original.lm_head.weight is original.transformer.wte.weight
    model = copy.deepcopy(original)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn", "lm_head"], init_lora_weights=init
    )
    with pytest.raises(ValueError, match=r"'lm_head'.*shared.*transformer\.wte\.weight"):
        lorakit.inject(model, config)
    _unchanged(model, original)


def test_a_weight_shared_between_two_targets_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    model[2].weight = model[0].weight
    before = model[0].weight.detach().clone()
    config = lorakit.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"module '0'.*shared"):
        lorakit.inject(model, config)
    assert torch.equal(model[0].weight, before) and not hasattr(model, "lorakit_state")


# ----------------------------------------------------------------- bug 7: init_lora_weights
@pytest.mark.parametrize("value", [0, 1, 1.0, 0.0])
def test_numbers_for_init_lora_weights_are_refused(value):
    with pytest.raises(ValueError, match=rf"init_lora_weights={value!r}.*True or False"):
        lorakit.LoraConfig(init_lora_weights=value)


def test_peft_does_not_treat_1_as_true():
    """Why 1 is refused rather than taken as True: PEFT fails on it (and takes 0 as False)."""
    with pytest.raises(AttributeError):
        peft.get_peft_model(
            tiny_models.llama(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=1)
        )


@pytest.mark.parametrize("value", [True, False, "gaussian", "eva", "pissa", "pissa_niter_3"])
def test_documented_init_values_are_accepted(value):
    assert lorakit.LoraConfig(init_lora_weights=value).init_lora_weights == value


# ----------------------------------------------------------------- bug 8: EvaConfig / LoftQConfig
@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        ("EvaConfig", dict(whiten="false"), "EvaConfig.whiten='false'"),
        ("EvaConfig", dict(whiten=1), "EvaConfig.whiten=1"),
        ("EvaConfig", dict(use_label_mask="no"), "EvaConfig.use_label_mask='no'"),
        ("EvaConfig", dict(adjust_scaling_factors=None), "EvaConfig.adjust_scaling_factors=None"),
        ("EvaConfig", dict(label_mask_value="x"), "EvaConfig.label_mask_value='x'"),
        ("EvaConfig", dict(label_mask_value=True), "EvaConfig.label_mask_value=True"),
        ("EvaConfig", dict(label_mask_value=-100.0), "EvaConfig.label_mask_value=-100.0"),
        ("EvaConfig", dict(rho=True), "EvaConfig.rho=True"),
        ("EvaConfig", dict(rho=float("inf")), "EvaConfig.rho=inf"),
        ("EvaConfig", dict(tau=True), "EvaConfig.tau=True"),
        ("EvaConfig", dict(tau=float("nan")), "EvaConfig.tau=nan"),
        ("LoftQConfig", dict(loftq_iter=True), "LoftQConfig.loftq_iter=True"),
        ("LoftQConfig", dict(loftq_bits=4.0), "LoftQConfig.loftq_bits=4.0"),
        ("LoftQConfig", dict(loftq_bits=True), "LoftQConfig.loftq_bits=True"),
    ],
)
def test_wrongly_typed_settings_are_refused(kind, fields, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        getattr(lorakit, kind)(**fields)


def test_settings_given_as_a_dict_are_checked_too():
    with pytest.raises(ValueError, match=r"EvaConfig\.whiten=1"):
        lorakit.LoraConfig(init_lora_weights="eva", eva_config=dict(whiten=1))


def test_well_typed_settings_are_accepted():
    eva = lorakit.EvaConfig(rho=1, tau=1, label_mask_value=-1, whiten=True, use_label_mask=False)
    assert (eva.rho, eva.tau, eva.whiten) == (1, 1, True)
    assert lorakit.LoftQConfig(loftq_bits=8, loftq_iter=3).loftq_bits == 8
