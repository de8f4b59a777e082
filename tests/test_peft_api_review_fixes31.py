"""Fixes from the 31st review of the PEFT front door (``lorakit.PeftModel``), with the real
``peft`` package as the oracle: ``load_adapter(..., is_trainable=True)`` makes the new adapter
trainable; ``with disable_adapter():`` freezes the adapters within the block and restores every
flag after it; ``peft_config[name].inference_mode`` after loading; the parameter names of both
libraries as the migration guide states them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from tests import tiny_models

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-peft.md"

CONFIGS = {
    "lora": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "dora-saved": dict(
        r=2, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"]
    ),
    "tokens": dict(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 3]),
}
TOKEN_DELTA = re.compile(r"^(.*)\.modules_to_save\.([^.]+)\.token_adapter\.trainable_tokens_delta$")


def _peft_name(name: str) -> str:
    """lorakit's parameter name (``model.<module path>...``) as peft names that tensor
    (``base_model.model.<module path>...``; token rows ``...token_adapter.trainable_tokens_delta.<adapter>``)."""
    name = TOKEN_DELTA.sub(r"\1.token_adapter.trainable_tokens_delta.\2", name)
    return "base_model." + name


def _trainable(model, ours: bool) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {_peft_name(n) for n in names} if ours else names


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.fixture
def saved_adapter(request, tmp_path):
    """A lorakit adapter (``CONFIGS[request.param]``, random non-zero factors) saved in PEFT's
    format; both libraries load it."""
    model = get_peft_model(tiny_models.llama(), LoraConfig(**CONFIGS[request.param]))
    tiny_models.randomize_adapters(model.model, std=0.2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _both_loaded(directory, is_trainable: bool, first_trainable: bool = True):
    """``(ours, theirs)``: each library's ``from_pretrained(is_trainable=first_trainable)`` of
    ``directory`` plus ``load_adapter(directory, "second", is_trainable)``."""
    pair = []
    for library in (lorakit, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = library.PeftModel.from_pretrained(
                tiny_models.llama(), directory, is_trainable=first_trainable
            )
            model.load_adapter(directory, "second", is_trainable=is_trainable)
        pair.append(model)
    return pair


# ------------------------------------------------- 1. load_adapter(is_trainable=True)
@pytest.mark.parametrize("saved_adapter", sorted(CONFIGS), indirect=True)
@pytest.mark.parametrize("is_trainable", [True, False], ids=["trainable", "frozen"])
def test_load_adapter_trains_the_same_tensors_as_peft(saved_adapter, is_trainable):
    ours, theirs = _both_loaded(saved_adapter, is_trainable)
    after_load = _trainable(theirs, ours=False)
    assert any(".second" in n for n in after_load) is is_trainable
    assert _trainable(ours, ours=True) == after_load
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for active in ("second", "default"):
        ours.set_adapter(active)
        theirs.set_adapter(active)
        assert _trainable(ours, ours=True) == _trainable(theirs, ours=False), active


@pytest.mark.parametrize("saved_adapter", ["lora"], indirect=True)
def test_an_optimizer_built_after_load_adapter_trains_the_loaded_adapter_as_peft(saved_adapter):
    """The reviewer's run: the optimizer takes what requires grad after ``load_adapter``; one
    SGD step on adapter "second" changes its ``lora_B`` by what peft's step changes it."""
    ids = tiny_models.input_ids()
    changes = []
    for model in _both_loaded(saved_adapter, is_trainable=True):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.set_adapter("second")
        lora_B = next(p for n, p in model.named_parameters() if "lora_B.second" in n)
        before = lora_B.detach().clone()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        changes.append(lora_B.detach() - before)
    assert changes[1].abs().max() > 1e-4  # peft's step moves it
    torch.testing.assert_close(changes[0], changes[1], rtol=1e-4, atol=1e-7)


# ------------------------------------------------- 2. the disable_adapter() context
def _bias_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_models.llama_config(attention_bias=True)).eval()


DISABLE_CASES = {
    "saved": (tiny_models.llama, CONFIGS["dora-saved"]),
    "tokens": (tiny_models.llama, CONFIGS["tokens"]),
    "bias-all": (_bias_llama, dict(r=2, target_modules=["q_proj"], bias="all")),
}


@pytest.mark.parametrize("case", sorted(DISABLE_CASES))
def test_disable_adapter_freezes_within_the_block_as_peft(case):
    build, fields = DISABLE_CASES[case]
    ours = get_peft_model(build(), LoraConfig(**fields))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**fields))
    before = _flags(ours)
    assert _trainable(ours, ours=True) == _trainable(theirs, ours=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (bias="all": the trained biases stay)
        with ours.disable_adapter(), theirs.disable_adapter():
            inside = _trainable(theirs, ours=False)
            assert _trainable(ours, ours=True) == inside
            assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
            assert all("bias" in n for n in inside)  # peft: the trained biases only
    assert _flags(ours) == before


def test_disable_adapter_restores_the_flags_after_an_exception_and_keeps_odd_ones():
    """Every flag after the block is what it was before, whatever set it: a frozen adapter
    stays frozen, an inactive trainable one stays trainable, also when the block raises."""
    model = get_peft_model(tiny_models.llama(), LoraConfig(**CONFIGS["dora-saved"]))
    model.add_adapter("frozen", LoraConfig(r=2, target_modules=["o_proj"]))
    model.add_adapter("trained", LoraConfig(r=2, target_modules=["k_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_A.default" in name:  # part of the active adapter frozen by hand
            parameter.requires_grad_(False)
        elif ".trained." in name:  # an inactive adapter made trainable by hand
            parameter.requires_grad_(True)
    before = _flags(model)
    assert any(before.values()) and not all(before.values())
    with pytest.raises(RuntimeError, match="inside"), model.disable_adapter():
        assert model.get_nb_trainable_parameters()[0] == 0
        raise RuntimeError("inside")
    assert _flags(model) == before


def test_disable_adapter_still_gives_the_base_output_and_trains_after_it():
    model = get_peft_model(tiny_models.llama(), LoraConfig(**CONFIGS["lora"]))
    tiny_models.randomize_adapters(model.model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        base = tiny_models.llama()(input_ids=ids).logits
        with model.disable_adapter():
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, base, rtol=0, atol=0)
    trained = tiny_models.sgd_steps(model, ids, steps=1)
    assert len(trained) == 8  # q/v A and B in two layers, trainable again
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


# ------------------------------------------------- 4. peft_config[name].inference_mode
@pytest.mark.parametrize("saved_adapter", ["lora"], indirect=True)
@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_sets_inference_mode_as_peft(saved_adapter, is_trainable):
    pair = _both_loaded(saved_adapter, not is_trainable, first_trainable=is_trainable)
    modes = [{k: c.inference_mode for k, c in model.peft_config.items()} for model in pair]
    assert modes[0] == modes[1] == {"default": not is_trainable, "second": is_trainable}


@pytest.mark.parametrize("saved_adapter", ["lora"], indirect=True)
def test_an_inference_mode_config_saves_and_reloads_trainable(saved_adapter, tmp_path):
    """The recorded ``inference_mode=True`` changes nothing a later load decides."""
    model = PeftModel.from_pretrained(tiny_models.llama(), saved_adapter)
    assert model.peft_config["default"].inference_mode is True
    model.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "again", is_trainable=True)
    assert again.peft_config["default"].inference_mode is False
    fresh = get_peft_model(tiny_models.llama(), LoraConfig(**CONFIGS["lora"]))
    assert again.get_nb_trainable_parameters() == fresh.get_nb_trainable_parameters()
    assert again.get_nb_trainable_parameters()[0] == 2 * (2 * 64 + 64 * 2 + 2 * 64 + 32 * 2)


# ------------------------------------------------- 3. the guide states both naming schemes
def test_the_guide_names_parameters_as_both_libraries_do():
    """docs/migrating-from-peft.md, "Where lorakit deliberately differs", quotes a LoRA
    factor's and a token row's name in each library: each is a real name in that library."""
    section = DOC.read_text().split("## Where lorakit deliberately differs")[1].split("\n## ")[0]
    quoted = set(re.findall(r"`((?:base_model\.)?model\.model\.[\w.]+)`", section))
    fields = CONFIGS["tokens"]
    ours = {
        n for n, _ in get_peft_model(tiny_models.llama(), LoraConfig(**fields)).named_parameters()
    }
    theirs = {
        n
        for n, _ in peft.get_peft_model(
            tiny_models.llama(), peft.LoraConfig(**fields)
        ).named_parameters()
    }
    ours_quoted = {n for n in quoted if not n.startswith("base_model.")}
    theirs_quoted = quoted - ours_quoted
    assert {n for n in ours_quoted if "lora_A" in n} and {n for n in ours_quoted if "token" in n}
    assert {n for n in theirs_quoted if "lora_A" in n} and {
        n for n in theirs_quoted if "token" in n
    }
    assert ours_quoted <= ours and theirs_quoted <= theirs
