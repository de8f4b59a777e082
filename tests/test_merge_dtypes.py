"""Merging across dtypes: ``merge_and_unload(float_dtype=...)`` rounds each merged weight once,
to the dtype asked (a bf16 base's update was rounded to bf16 first, then widened), and
``lorakit merge --dtype`` writes the merged model in the dtype asked, the sum in float32."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import cli
from lorakit.io import save_adapter
from tests import tiny_models

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapted(dtype: torch.dtype, std: float = 0.02, **config):
    model = tiny_models.llama(dtype=dtype)
    spec = dict(r=4, lora_alpha=8, target_modules=TARGETS) | config
    lorakit.inject(model, lorakit.LoraConfig(**spec))
    tiny_models.randomize_adapters(model, std=std)
    return model


def _exact_update(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, s B A) in float64, from the layer's own tensors."""
    W0 = layer.base_layer.weight.detach().double()
    A = layer.lora_A["default"].weight.detach().double()
    B = layer.lora_B["default"].weight.detach().double()
    return W0, layer.scalings["default"] * (B @ A)


def test_a_bf16_base_merged_into_float32_is_rounded_once():
    model = _adapted(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    W0, update = _exact_update(layer)
    merged = lorakit.merge_and_unload(model, float_dtype=torch.float32)
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32
    error = (weight.double() - W0 - update).norm() / update.norm()
    assert error < 1e-6, error  # rounded to bf16 first it was ~2e-2


def test_merging_into_a_narrower_dtype_still_rounds_once():
    model = _adapted(torch.float32)
    layer = model.model.layers[1].mlp.down_proj
    W0, update = _exact_update(layer)
    merged = lorakit.merge_and_unload(model, float_dtype=torch.bfloat16)
    weight = merged.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, (W0 + update).to(torch.bfloat16))


def test_a_lora_bias_merged_into_float32_is_rounded_once():
    """GPT-2's Conv1D layers have biases: the merged bias b0 + s b is rounded once too."""
    model = tiny_models.gpt2().to(torch.bfloat16)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_bias=True)
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.02)
    layer = model.transformer.h[0].attn.c_attn
    bias0 = layer.base_layer.bias.detach().double()
    update = layer.scalings["default"] * layer.lora_B["default"].bias.detach().double()
    merged = lorakit.merge_and_unload(model, float_dtype=torch.float32)
    bias = merged.transformer.h[0].attn.c_attn.bias
    assert bias.dtype == torch.float32
    assert (bias.double() - bias0 - update).norm() / update.norm() < 1e-6


def _merge_cli(capsys, model_dir, adapter, output, *options) -> tuple[int, str]:
    argv = ["merge", "--model", model_dir, "--adapter", adapter, "--output", output, *options]
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def adapter_dir(tmp_path, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    tiny_models.randomize_adapters(model, std=0.02)
    return save_adapter(model, tmp_path / "adapter")


def test_merge_dtype_writes_the_merged_model_in_that_dtype(
    tmp_path, capsys, model_dir, adapter_dir
):
    code, text = _merge_cli(capsys, model_dir, adapter_dir, tmp_path / "m16", "--dtype", "bfloat16")
    assert code == 0 and "merged model (bfloat16) saved to" in text
    with safe_open(str(tmp_path / "m16" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    merged16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert merged16.dtype == torch.bfloat16
    assert _merge_cli(capsys, model_dir, adapter_dir, tmp_path / "m32")[0] == 0
    merged32 = AutoModelForCausalLM.from_pretrained(tmp_path / "m32")
    weight16 = merged16.model.layers[0].self_attn.q_proj.weight
    weight32 = merged32.model.layers[0].self_attn.q_proj.weight
    assert weight32.dtype == torch.float32
    assert torch.equal(weight16, weight32.to(torch.bfloat16))  # one rounding of the fp32 sum


def test_an_empty_output_is_refused_and_nothing_is_written(
    tmp_path, capsys, monkeypatch, model_dir, adapter_dir
):
    monkeypatch.chdir(tmp_path)
    code, text = _merge_cli(capsys, model_dir, adapter_dir, "")
    assert code == 2 and "--output is empty" in text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_a_quantized_base_adapter_loaded_on_the_float_model_names_the_quantization(
    tmp_path, capsys, model_dir
):
    from lorakit.models import load_model

    trained, _ = load_model(str(model_dir), quantization="int8-rows")
    lorakit.inject(trained, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    save_adapter(trained, tmp_path / "adapter")
    code, text = _merge_cli(capsys, model_dir, tmp_path / "adapter", tmp_path / "merged")
    assert code == 2 and "trained on an int8-rows base" in text
    assert "pass --quantization int8-rows" in text


def test_combining_a_float_and_a_quantized_base_adapter_names_both_formats(tmp_path, model_dir):
    from lorakit.errors import UserError
    from lorakit.models import load_model

    for quantization in (None, "int8-rows"):
        model, _ = load_model(str(model_dir), quantization=quantization)
        lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        tiny_models.randomize_adapters(model, std=0.1)
        save_adapter(model, tmp_path / str(quantization))
    with pytest.raises(UserError, match="base formats float32 and int8-rows"):
        lorakit.combine([tmp_path / "None", tmp_path / "int8-rows"])


def test_combining_a_lora_bias_adapter_says_to_merge_it_instead(tmp_path):
    from lorakit.errors import UserError

    model = tiny_models.gpt2()
    config = lorakit.LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True)
    lorakit.inject(model, config)
    save_adapter(model, tmp_path / "biased")
    with pytest.raises(UserError, match=r"lora_bias=True.*lorakit merge"):
        lorakit.combine([tmp_path / "biased", tmp_path / "biased"])
