"""Base-changing inits (PiSSA / OLoRA) where other adapters already are, and their conversion.

PiSSA and OLoRA rewrite the base weight in place (W0 -> W0 - s B0 A0); an adapter already on
that module was trained on W0, so adding one there is refused (inject and load_adapter), as
peft does not (it changes the first adapter's outputs without a word). Converting on save
needs the initial factors at full precision: rounded ones would not cancel the residual.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.errors import UserError
from tests import tiny_models

FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj"])


def model_with_first_adapter():
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**FIRST), adapter_name="a")
    tiny_models.randomize_adapters(model, std=0.2)  # non-zero B: the adapter changes outputs
    return model


def q_proj(model):
    return model.get_submodule("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inject_of_a_base_changing_init_where_an_adapter_is_is_refused(init):
    model = model_with_first_adapter()
    weight = q_proj(model).base_layer.weight.clone()
    ids = tiny_models.input_ids(1, 6)
    with torch.no_grad():
        before = model(ids).logits
    config = lorakit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=init
    )
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj' already holds adapters \['a'\]"
    ):
        lorakit.inject(model, config, adapter_name="b")
    assert torch.equal(q_proj(model).base_layer.weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    # elsewhere it is taken: v_proj holds no adapter
    other = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=init)
    lorakit.inject(model, other, adapter_name="b")


def test_load_adapter_of_a_peft_pissa_file_where_an_adapter_is_is_refused(tmp_path):
    base = tiny_models.llama()
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(base, config).save_pretrained(tmp_path / "pissa")
    model = model_with_first_adapter()
    weight = q_proj(model).base_layer.weight.clone()
    with pytest.raises(Exception, match=r"already holds adapters \['a'\]") as raised:
        lorakit.load_adapter(model, tmp_path / "pissa", adapter_name="p")
    assert isinstance(raised.value, ValueError | UserError)
    assert torch.equal(q_proj(model).base_layer.weight, weight)
    assert list(lorakit.adapter_configs(model)) == ["a"]


def test_conversion_refuses_an_initial_adapter_saved_in_bfloat16(tmp_path):
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    )
    model = lorakit.inject(tiny_models.llama(), config)
    lorakit.save_adapter(model, tmp_path / "initial16", dtype=torch.bfloat16)
    lorakit.save_adapter(model, tmp_path / "initial")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    with pytest.raises(UserError, match=r"lora_[AB]\.weight in torch\.bfloat16"):
        lorakit.save_adapter(
            model, tmp_path / "converted16", initial_adapter=tmp_path / "initial16"
        )
    assert not (tmp_path / "converted16").exists()
    # at full precision the converted LoRA on the original base is the trained model
    lorakit.save_adapter(model, tmp_path / "converted", initial_adapter=tmp_path / "initial")
    original = lorakit.load_adapter(tiny_models.llama(), tmp_path / "converted")
    ids = tiny_models.input_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(original(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_float64_model_is_told_to_cast_to_float32():
    model = tiny_models.llama().double()
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(
        ValueError, match=r"torch\.float64: cast the model to float32 first"
    ) as raised:
        lorakit.inject(model, config)
    assert "unquantized" not in str(raised.value)
