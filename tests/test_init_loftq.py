"""LoftQ (``init_lora_weights="loftq"``, ``lorakit.init_factors.loftq_factors``) against peft's
own ``loftq_init`` (the oracle; peft runs it on CUDA only, so the test runs peft's source with
its device set to the CPU), then training, files both ways, merge/unmerge, ``lorakit inspect``."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import peft.tuners.lora.layer
import peft.utils.loftq_utils
import pytest
import torch

import lorakit
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.io import load_adapter, save_adapter
from lorakit.io.summary import summarize_adapter
from lorakit.quantized.round_trip import round_trip
from tests import tiny_models

TOLERANCE = 1e-5
FIELDS = dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq")


@pytest.mark.parametrize(("bits", "iterations"), [(4, 1), (4, 3), (8, 2)])
def test_factors_and_quantized_base_equal_peft(peft_loftq_on_cpu, bits, iterations):
    original = tiny_models.llama()
    loftq = dict(loftq_bits=bits, loftq_iter=iterations)
    ours = lorakit.inject(
        copy.deepcopy(original),
        lorakit.LoraConfig(**FIELDS, loftq_config=lorakit.LoftQConfig(**loftq)),
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(**FIELDS, loftq_config=peft.LoftQConfig(**loftq))
    )
    theirs_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    compared = 0
    for key, value in ours.state_dict().items():
        if "q_proj" in key or "v_proj" in key:
            torch.testing.assert_close(value, theirs_state[key], rtol=0, atol=1e-6)
            compared += 1
    assert compared == 2 * 2 * 3
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    quantized = layer.base_layer.weight
    assert torch.equal(round_trip(quantized, bits), quantized)  # Q is on the grid already
    before = original.get_submodule("model.layers.0.self_attn.q_proj").weight
    lora = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (before - quantized - lora).norm() < (before - quantized).norm()


def test_front_door_trains_merges_and_round_trips_with_peft(tmp_path):
    original = tiny_models.llama()
    model = lorakit.get_peft_model(copy.deepcopy(original), lorakit.LoraConfig(**FIELDS))
    ids = tiny_models.input_ids()
    tiny_models.sgd_steps(model, ids)
    trained = model(ids).logits.detach()
    layer = model.model.get_submodule("model.layers.1.self_attn.v_proj")
    base = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits.detach(), trained, rtol=0, atol=TOLERANCE)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, base)
    model.save_pretrained(tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"]
        is True
    )  # peft would rerun LoftQ on the quantized base
    quantized_model = lorakit.unload(copy.deepcopy(model.model))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(quantized_model), tmp_path / "ours")
    torch.testing.assert_close(theirs(ids).logits.detach(), trained, rtol=0, atol=TOLERANCE)
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_adapter(copy.deepcopy(quantized_model), tmp_path / "theirs")
    torch.testing.assert_close(ours(ids).logits.detach(), trained, rtol=0, atol=TOLERANCE)
    with pytest.raises(BaseModelMismatchError):
        load_adapter(copy.deepcopy(original), tmp_path / "ours")
    assert summarize_adapter(tmp_path / "ours")["ranks"] == {"2": 4}


def test_peft_loftq_file_loads_onto_its_quantized_base(peft_loftq_on_cpu, tmp_path):
    theirs = peft.get_peft_model(
        tiny_models.llama(), peft.LoraConfig(**FIELDS, loftq_config=peft.LoftQConfig())
    )
    theirs.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "loftq"
    )
    ids = tiny_models.input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_adapter(copy.deepcopy(theirs).unload(), tmp_path)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=TOLERANCE)
    assert summarize_adapter(tmp_path)["init_lora_weights"] == "loftq"


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="loftq_bits=3"):
        lorakit.LoftQConfig(loftq_bits=3)
    with pytest.raises(ValueError, match="loftq_iter=0"):
        lorakit.LoftQConfig(loftq_iter=0)
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**FIELDS))
    save_adapter(model, tmp_path / "init")
    with pytest.raises(UserError, match="LoftQ adapter cannot be converted"):
        save_adapter(model, tmp_path / "out", initial_adapter=tmp_path / "init")
