"""PiSSA / OLoRA initialisations (``lorakit.init_factors``) and convert-on-save
(``lorakit.io.convert``) against the real ``peft`` (the oracle): same factors and residual base,
a few training steps, files both ways, merge/unmerge, ``lorakit inspect``, and the converted
rank-2r adapter on the original base."""

from __future__ import annotations

import copy
import json
import math
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.commands.inspect import format_summary
from lorakit.errors import BaseModelMismatchError
from lorakit.io import load_adapter, save_adapter
from lorakit.io.summary import summarize_adapter
from tests import tiny_models

TOLERANCE = 1e-5
INITS = ["pissa", "pissa_niter_3", "olora"]
FIELDS = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _train(model, steps: int = 3) -> None:
    """A few SGD steps on a language-model loss (changes A and B of every adapted layer)."""
    tiny_models.sgd_steps(model, tiny_models.input_ids(seed=5), steps)


def _peft_model(base, init: str, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**FIELDS, init_lora_weights=init, **extra))


@pytest.mark.parametrize("init", INITS)
def test_factors_and_residual_base_equal_peft(init):
    original = tiny_models.llama()
    torch.manual_seed(11)  # pissa_niter_K is randomised: the same seed gives peft's draws
    ours = lorakit.inject(
        copy.deepcopy(original), lorakit.LoraConfig(**FIELDS, init_lora_weights=init)
    )
    torch.manual_seed(11)
    theirs = _peft_model(copy.deepcopy(original), init)
    theirs_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    compared = 0
    for key, value in ours.state_dict().items():
        if "q_proj" in key or "down_proj" in key:
            torch.testing.assert_close(value, theirs_state[key], rtol=0, atol=1e-6)
            compared += 1
    assert compared == 2 * 2 * 3  # 2 layers x 2 modules x (base, A, B)
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(original, ids), rtol=0, atol=TOLERANCE)
    base = ours.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight
    assert (
        base - original.get_submodule("model.layers.0.self_attn.q_proj").weight
    ).abs().max() > 1e-3


def test_pissa_factors_are_the_scaled_principal_part():
    weight = torch.randn(6, 5)
    lora_A, lora_B, residual = lorakit.init_factors.pissa_factors(weight, rank=2, scale=0.5)
    left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(0.5 * lora_B @ lora_A, left[:, :2] * values[:2] @ right_t[:2])
    torch.testing.assert_close(residual + 0.5 * lora_B @ lora_A, weight)
    torch.testing.assert_close(torch.linalg.matrix_norm(residual, 2), values[2])


def test_olora_on_conv1d_keeps_the_output():
    original = tiny_models.gpt2()
    model = lorakit.inject(
        copy.deepcopy(original),
        lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="olora"),
    )
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("init", INITS)
def test_front_door_trains_merges_and_round_trips_with_peft(init, tmp_path):
    original = tiny_models.llama()
    model = lorakit.get_peft_model(
        copy.deepcopy(original), lorakit.LoraConfig(**FIELDS, init_lora_weights=init)
    )
    _train(model)
    ids = tiny_models.input_ids()
    trained = _logits(model, ids)
    assert (trained - _logits(original, ids)).abs().max() > 1e-4
    layer = model.model.get_submodule("model.layers.1.mlp.down_proj")
    residual = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), trained, rtol=0, atol=TOLERANCE)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, residual)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # peft would redo the init on the residual base
    residual_model = lorakit.unload(copy.deepcopy(model.model))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(residual_model), tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), trained, rtol=0, atol=TOLERANCE)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(residual_model), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), trained, rtol=0, atol=TOLERANCE)
    with pytest.raises(BaseModelMismatchError, match="different base weights"):
        load_adapter(copy.deepcopy(original), tmp_path)  # records the residual's fingerprint
    assert f"init:            {init} (fits the base" in format_summary(summarize_adapter(tmp_path))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_saved_adapter_reruns_the_init_on_the_original_base(init, tmp_path):
    """As peft does for a file saying "pissa"/"olora": the base becomes W0 - s B0 A0 again."""
    theirs = _peft_model(tiny_models.llama(), init)
    _train(theirs)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    ids = tiny_models.input_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fingerprint in peft's file
        ours = load_adapter(tiny_models.llama(), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=TOLERANCE)
    layer = ours.get_submodule("model.layers.0.self_attn.q_proj")
    residual = theirs.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(layer.base_layer.weight, residual.base_layer.weight)
    summary = summarize_adapter(tmp_path)
    assert summary["init_lora_weights"] == init
    assert "init:" in format_summary(summary)
    assert "not the original weights" in format_summary(summary)


def _convert_both(init: str, tmp_path, **extra):
    """Inject with lorakit and peft (same seed), save both initial adapters, train ours, copy
    the trained factors into peft's, and save both converted. Returns (ours, original, dirs)."""
    original = tiny_models.llama()
    torch.manual_seed(2)
    ours = lorakit.get_peft_model(
        copy.deepcopy(original), lorakit.LoraConfig(**FIELDS, init_lora_weights=init, **extra)
    )
    torch.manual_seed(2)
    theirs = _peft_model(copy.deepcopy(original), init, **extra)
    ours.save_pretrained(tmp_path / "ours_init")
    theirs.peft_config["default"].init_lora_weights = True  # peft's documented recipe
    theirs.save_pretrained(tmp_path / "theirs_init")
    theirs.peft_config["default"].init_lora_weights = init
    _train(ours)
    state = {f"base_model.model.{k}": v for k, v in ours.model.state_dict().items() if "lora_" in k}
    theirs.load_state_dict(state, strict=False)
    ours.save_pretrained(
        tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours_init"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(
            tmp_path / "theirs",
            path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"),
        )
    return ours, original, tmp_path


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_convert_on_save_equals_peft_and_fits_the_original_base(init, rslora, tmp_path):
    ours, original, root = _convert_both(init, tmp_path, use_rslora=rslora)
    ours_config = json.loads((root / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((root / "theirs" / "adapter_config.json").read_text())
    for key in ("r", "init_lora_weights", "use_rslora"):
        assert ours_config[key] == theirs_config[key]
    assert ours_config["r"] == 4
    assert math.isclose(ours_config["lora_alpha"], theirs_config["lora_alpha"])
    assert math.isclose(ours_config["lora_alpha"], 4 * (math.sqrt(2) if rslora else 2))
    ours_tensors = lorakit.io.read_adapter(root / "ours").tensors
    theirs_tensors = lorakit.io.read_adapter(root / "theirs").tensors
    assert set(ours_tensors) == set(theirs_tensors)
    for key, value in ours_tensors.items():
        torch.testing.assert_close(value, theirs_tensors[key], rtol=0, atol=1e-6)
    ids = tiny_models.input_ids()
    trained = _logits(ours, ids)
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), root / "ours")
    torch.testing.assert_close(_logits(peft_loaded, ids), trained, rtol=0, atol=TOLERANCE)
    ours_loaded = load_adapter(copy.deepcopy(original), root / "theirs")
    torch.testing.assert_close(_logits(ours_loaded, ids), trained, rtol=0, atol=TOLERANCE)
    # the converted file carries the ORIGINAL base's fingerprint: refused on the residual base
    load_adapter(copy.deepcopy(original), root / "ours", adapter_name="converted")
    with pytest.raises(BaseModelMismatchError):
        load_adapter(lorakit.unload(copy.deepcopy(ours.model)), root / "ours")
    assert "rank:" in format_summary(summarize_adapter(root / "ours"))
    assert summarize_adapter(root / "ours")["ranks"] == {"4": 6}


def test_convert_refuses_an_initial_adapter_of_another_shape(tmp_path):
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(**FIELDS, init_lora_weights="pissa")
    )
    other = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**{**FIELDS, "r": 3}))
    save_adapter(other, tmp_path / "init")
    with pytest.raises(lorakit.errors.UserError, match=r"does not fit.*lora_A"):
        save_adapter(model, tmp_path / "out", initial_adapter=tmp_path / "init")


def test_config_checks_name_the_problem():
    with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_x'"):
        lorakit.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="use_dora=True"):
        lorakit.LoraConfig(init_lora_weights="olora", use_dora=True)
    config = lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa")
    model = tiny_models.llama()
    with pytest.raises(ValueError, match=r"nn\.Linear and Conv1D only.*embed_tokens"):
        lorakit.inject(model, config)
    assert not hasattr(model, "lorakit_state")  # refused before any change


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_through_inject_and_save_adapter(init, tmp_path):
    original = tiny_models.llama()
    config = lorakit.LoraConfig(**FIELDS, init_lora_weights=init, modules_to_save=["lm_head"])
    model = lorakit.inject(copy.deepcopy(original), config)
    save_adapter(model, tmp_path / "init")
    tiny_models.randomize_adapters(model)  # stands in for training (every A, B and the head)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.01)
    ids = tiny_models.input_ids()
    trained = _logits(model, ids)
    save_adapter(model, tmp_path / "plain", initial_adapter=tmp_path / "init")
    loaded = load_adapter(copy.deepcopy(original), tmp_path / "plain")  # fingerprint fits W0
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=0, atol=TOLERANCE)
    assert lorakit.adapter_configs(loaded)["default"].r == 4
