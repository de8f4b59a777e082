"""Review fixes (round 30) of converting PiSSA / OLoRA adapters on save (``lorakit.io.convert``)
and of the init's residual base with coarse adapter factors (``lorakit.base_rewrite``):

1. converting in a later process (the residual model with the unconverted checkpoint loaded)
   no longer writes the RESIDUAL base's fingerprint, which refused the original base and
   accepted the residual one (0.27 off there);
2. bfloat16 factors on a float32 base: ``W_res`` follows from the factors as stored, so the
   model starts where the base model is (it was 5.4e-4 off in the logits);
3. the recorded prompt style is kept in the converted file;
4. converting an adapter whose init left the base as it was is refused (nothing written).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.errors import BaseModelMismatchError, UserError
from lorakit.io import load_adapter, read_adapter, save_adapter
from lorakit.io.fingerprint import weight_fingerprint
from lorakit.io.save import PROMPT_STYLE_METADATA_KEY, record_prompt_style
from lorakit.state import lora_layers, state_of
from tests import tiny_models

FIELDS = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
FLOAT32_ROUNDING = 2e-6  # logits of the tiny models are O(0.1..1)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _inject(original, init, seed=2, **options):
    torch.manual_seed(seed)
    config = lorakit.LoraConfig(**FIELDS, init_lora_weights=init)
    return lorakit.inject(copy.deepcopy(original), config, **options)


def _train(model):
    tiny_models.sgd_steps(model, tiny_models.input_ids(seed=5), 3)


# ----------------------------------------------------------------- 1. conversion in a later process
def _later_process(tmp_path, init):
    """inject, save the initial adapter, train, save the unconverted checkpoint and keep the
    residual model; then fresh objects: the residual model with the checkpoint loaded.
    Returns ``(original, residual, reloaded, trained logits)``."""
    original = tiny_models.llama()
    model = _inject(original, init)
    save_adapter(model, tmp_path / "init")
    _train(model)
    trained = _logits(model, tiny_models.input_ids())
    save_adapter(model, tmp_path / "ckpt")
    residual = lorakit.unload(copy.deepcopy(model))
    reloaded = load_adapter(copy.deepcopy(residual), tmp_path / "ckpt")
    assert lorakit.adapter_configs(reloaded)["default"].init_lora_weights is True  # (the file's)
    return original, residual, reloaded, trained


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converting_in_a_later_process_fits_the_original_base(init, tmp_path):
    original, residual, reloaded, trained = _later_process(tmp_path, init)
    save_adapter(reloaded, tmp_path / "conv", initial_adapter=tmp_path / "init")
    ids = tiny_models.input_ids()
    with pytest.warns(UserWarning, match="does not cover 6 of its modules"):  # (not checked)
        loaded = load_adapter(copy.deepcopy(original), tmp_path / "conv")  # was refused
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=0, atol=FLOAT32_ROUNDING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "conv")
    torch.testing.assert_close(_logits(theirs, ids), trained, rtol=0, atol=FLOAT32_ROUNDING)
    # No module carries the residual base's fingerprint (nor any: W0 is not in memory here).
    stored = read_adapter(tmp_path / "conv").fingerprint or {}
    residual_prints = {
        name: weight_fingerprint(residual.get_submodule(name).weight)
        for name, _ in lora_layers(reloaded)
    }
    assert residual_prints and not set(stored)
    assert all(stored.get(name) != value for name, value in residual_prints.items())


def test_converting_in_the_same_process_still_records_the_original_base(tmp_path):
    original = tiny_models.llama()
    model = _inject(original, "pissa")
    save_adapter(model, tmp_path / "init")
    _train(model)
    save_adapter(model, tmp_path / "conv", initial_adapter=tmp_path / "init")
    stored = read_adapter(tmp_path / "conv").fingerprint
    for name, _ in lora_layers(model):
        assert stored[name] == weight_fingerprint(original.get_submodule(name).weight)
    with pytest.raises(BaseModelMismatchError):
        load_adapter(lorakit.unload(copy.deepcopy(model)), tmp_path / "conv")


def test_a_later_conversion_with_peft_recipe_initial_adapter(tmp_path):
    """PEFT's recipe saves the initial adapter with init_lora_weights=True and no lorakit
    metadata: its non-zero B0 says the base was rewritten."""
    original, _, reloaded, trained = _later_process(tmp_path, "pissa")
    torch.manual_seed(2)
    config = peft.LoraConfig(**FIELDS, init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(original), config)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "peft_init")
    assert not read_adapter(tmp_path / "peft_init").metadata.get("lorakit.base_changing_init")
    save_adapter(reloaded, tmp_path / "conv", initial_adapter=tmp_path / "peft_init")
    with pytest.warns(UserWarning, match="does not cover 6 of its modules"):
        loaded = load_adapter(copy.deepcopy(original), tmp_path / "conv")
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=0, atol=FLOAT32_ROUNDING)
    assert not read_adapter(tmp_path / "conv").fingerprint


def test_a_later_conversion_of_loftq_is_refused(tmp_path):
    model = lorakit.inject(
        tiny_models.llama(),
        lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights="loftq"),
    )
    save_adapter(model, tmp_path / "init")
    save_adapter(model, tmp_path / "ckpt")
    reloaded = load_adapter(lorakit.unload(copy.deepcopy(model)), tmp_path / "ckpt")
    with pytest.raises(UserError, match="LoftQ adapter cannot be converted"):
        save_adapter(reloaded, tmp_path / "out", initial_adapter=tmp_path / "init")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- 2. bfloat16 factors, float32 base
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bfloat16_factors_on_a_float32_base_start_at_the_base_model(init, tmp_path):
    original = tiny_models.llama()
    model = _inject(original, init, adapter_dtype=torch.bfloat16)
    ids = tiny_models.input_ids()
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=0, atol=1e-6)
    for name, layer in lora_layers(model):
        A, B = (p.detach().double() for p in layer.adapter_parameters("default")[:2])
        assert layer.lora_A["default"].weight.dtype == torch.bfloat16
        start = layer.base_layer.weight.double() + layer.scalings["default"] * B @ A
        W0 = original.get_submodule(name).weight.double()
        assert (start - W0).abs().max().item() < 1e-6 * W0.abs().max().item(), name  # was 1e-3
    save_adapter(model, tmp_path / "init")
    _train(model)
    trained = _logits(model, ids)
    save_adapter(model, tmp_path / "conv", initial_adapter=tmp_path / "init")
    loaded = load_adapter(copy.deepcopy(original), tmp_path / "conv")
    torch.testing.assert_close(_logits(loaded, ids), trained, rtol=0, atol=FLOAT32_ROUNDING)


def test_float32_factors_keep_the_exact_residual_base():
    """The default (float32 factors on a float32 base) is unchanged: W_res = W0 - s B A with
    the init's own factors, bit for bit (as peft's)."""
    original = tiny_models.llama()
    model = _inject(original, "pissa")
    for name, layer in lora_layers(model):
        weight = original.get_submodule(name).weight.detach()
        _, _, expected = lorakit.init_factors.pissa_factors(weight, 2, layer.scalings["default"])
        assert torch.equal(layer.base_layer.weight, expected), name


def test_bfloat16_factors_on_a_bfloat16_base_keep_peft_residual_base():
    """PEFT's autocast_adapter_dtype=False on a bfloat16 base computes W_res from the float32
    factors; lorakit keeps that (rounding the factors first would not bring W_res + s B A
    closer to W0 there: W_res is rounded to bfloat16 anyway)."""
    original = tiny_models.llama(dtype=torch.bfloat16)
    ours = _inject(original, "pissa", adapter_dtype=torch.bfloat16)
    theirs = peft.get_peft_model(
        copy.deepcopy(original),
        peft.LoraConfig(**FIELDS, init_lora_weights="pissa"),
        autocast_adapter_dtype=False,
    )
    for name, layer in lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert peft_layer.lora_A["default"].weight.dtype == torch.bfloat16
        assert torch.equal(layer.base_layer.weight, peft_layer.base_layer.weight), name


# ----------------------------------------------------------------- 3. prompt style kept
def test_the_converted_file_keeps_the_prompt_style(tmp_path):
    original = tiny_models.llama()
    model = _inject(original, "olora")
    save_adapter(model, tmp_path / "init")
    record_prompt_style(model, "chat")
    _train(model)
    save_adapter(model, tmp_path / "conv", initial_adapter=tmp_path / "init")
    assert read_adapter(tmp_path / "conv").metadata[PROMPT_STYLE_METADATA_KEY] == "chat"
    loaded = load_adapter(copy.deepcopy(original), tmp_path / "conv")
    assert state_of(loaded).prompt_styles == {"default": "chat"}
    assert "lorakit.base_changing_init" not in read_adapter(tmp_path / "conv").metadata


# ----------------------------------------------------------------- 4. nothing to convert
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_converting_an_adapter_that_left_the_base_as_it_was_is_refused(init, tmp_path):
    model = _inject(tiny_models.llama(), init)
    save_adapter(model, tmp_path / "init")
    _train(model)
    with pytest.raises(UserError, match=rf"init_lora_weights={init!r}.*without initial_adapter"):
        save_adapter(model, tmp_path / "out", initial_adapter=tmp_path / "init")
    assert not (tmp_path / "out").exists()
