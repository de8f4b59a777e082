"""Parity with the real ``peft`` (``peft.tuners.lora.bnb``) on a tiny Llama loaded through
transformers' ``BitsAndBytesConfig`` (how PEFT users arrive): the same adapter values give the
same logits and the same LoRA gradients within 1e-5, and adapter files move both ways.

Compared in training mode (the config has no dropout): there PEFT and lorakit run the same
bitsandbytes kernels (see tests/test_quantized_layers.py for eval mode)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorakit
from lorakit.io import load_adapter, save_adapter
from lorakit.layers import QuantizedLoraLinear
from lorakit.state import lora_layers
from tests import tiny_models

TOLERANCE = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATIONS = {
    "nf4-dq": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-float")
    tiny_models.llama().save_pretrained(directory)
    return directory


def _load(directory, quantization: str):
    config = BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=config, device_map="cpu", dtype=torch.float32
        )
    return model.train()


def _config_fields() -> dict:
    return dict(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )


def _pair(directory, quantization: str):
    """(lorakit model, peft model) on two loads of the same quantized checkpoint, with the
    same random adapter values (lorakit's, copied into peft's tensors by key)."""
    ours = lorakit.inject(_load(directory, quantization), lorakit.LoraConfig(**_config_fields()))
    tiny_models.randomize_adapters(ours, std=0.1)
    theirs = peft.get_peft_model(
        _load(directory, quantization), peft.LoraConfig(**_config_fields())
    )
    values = {key: p for key, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for key, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(values[key.removeprefix("base_model.model.")])
    return ours, theirs


@pytest.mark.parametrize("quantization", sorted(QUANTIZATIONS))
def test_logits_and_lora_gradients_equal_peft_on_a_bitsandbytes_model(float_dir, quantization):
    ours, theirs = _pair(float_dir, quantization)
    assert len(dict(lora_layers(ours))) == 14
    assert all(type(layer) is QuantizedLoraLinear for _, layer in lora_layers(ours))
    ids = tiny_models.input_ids()
    our_loss = ours(ids, labels=ids)
    their_loss = theirs(ids, labels=ids)
    torch.testing.assert_close(our_loss.logits, their_loss.logits, rtol=0, atol=TOLERANCE)
    our_loss.loss.backward()
    their_loss.loss.backward()
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    their_grads = {
        k.removeprefix("base_model.model."): p.grad
        for k, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 28
    for key, grad in our_grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(grad, their_grads[key], rtol=0, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4-dq", "int8"])
def test_adapter_files_move_between_peft_and_lorakit_on_a_quantized_base(
    float_dir, quantization, tmp_path
):
    ours, theirs = _pair(float_dir, quantization)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = ours(ids).logits
    save_adapter(ours, tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_by_peft = peft.PeftModel.from_pretrained(
            _load(float_dir, quantization), tmp_path / "lorakit"
        ).train()
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        loaded_by_us = load_adapter(_load(float_dir, quantization), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded_by_peft(ids).logits, expected, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(loaded_by_us(ids).logits, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4-dq", "int8"])
def test_merge_and_unload_of_a_bitsandbytes_model_saves_and_reloads_as_a_float_model(
    float_dir, quantization, tmp_path
):
    ours, _ = _pair(float_dir, quantization)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        unmerged = ours(ids).logits
    plain = lorakit.merge_and_unload(ours)
    assert getattr(plain.config, "quantization_config", None) is None
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(reloaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, unmerged, rtol=0, atol=TOLERANCE)
