"""Review 38 fixes of ``lorakit analyze`` / ``lorakit extract``: quantized checkpoints refused
before any output, parameters only one model has listed, a convolution adapter named as
unsupported, a change only in a tied layer explained by extract, an embedding update's
(num_embeddings, dim) shape, an all-zero adapter refused like two identical models, and a layer
missing from both checkpoints blamed on both. Values against float64 NumPy and peft."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from lorakit.cli import main
from tests import tiny_models
from tests.tiny_models import fine_tuned


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _singular_values(matrix) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _llama(layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_models.llama_config(num_hidden_layers=layers)).eval()


# --- 1 + 2: quantized checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def nf4_dirs(tmp_path_factory):
    """A float base, its float fine-tune, and both saved in bitsandbytes 4-bit NF4."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("nf4")
    base = tiny_models.llama()
    base.save_pretrained(root / "base")
    fine_tuned(base).save_pretrained(root / "tuned")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    for name in ("base", "tuned"):
        quantized = AutoModelForCausalLM.from_pretrained(
            root / name, quantization_config=nf4, device_map="cpu"
        )
        quantized.save_pretrained(root / f"{name}_nf4")
    return root


def test_nf4_files_hold_packed_codes_not_the_weights(nf4_dirs):
    """Why a comparison of the stored tensors is wrong: q_proj's stored tensor is packed uint8
    codes of another shape; bitsandbytes' own dequantize of them gives the (64, 64) weight."""
    import bitsandbytes.functional as bnb_functional

    stored = _weights(nf4_dirs / "base_nf4")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert stored[name].dtype == torch.uint8 and stored[name].shape != (64, 64)
    state = bnb_functional.QuantState.from_dict(
        {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")},
        device=torch.device("cpu"),
    )
    weight = bnb_functional.dequantize_4bit(stored[name], state).float()
    float_weight = _weights(nf4_dirs / "base")[name]
    assert weight.shape == float_weight.shape == (64, 64)
    assert 0 < float((weight - float_weight).norm() / float_weight.norm()) < 0.2


@pytest.mark.parametrize(
    "base, tuned, quantized",
    [
        ("base_nf4", "tuned", "base_nf4"),
        ("tuned", "base_nf4", "base_nf4"),
        ("base_nf4", "tuned_nf4", "base_nf4"),
    ],
)
def test_quantized_checkpoint_refused_before_any_output(
    nf4_dirs, tmp_path, capsys, base, tuned, quantized
):
    pair = ["--base", nf4_dirs / base, "--finetuned", nf4_dirs / tuned]
    commands = {
        "analyze": ["analyze", *pair, "--json", "--plots", tmp_path / "plots"],
        "extract": ["extract", *pair, "--output", tmp_path / "adapter", "--rank", "2"],
    }
    for argv in commands.values():
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == ""
        assert (
            f"{nf4_dirs / quantized} holds a model quantized with bitsandbytes 4-bit (nf4)" in err
        )
        assert "give the float checkpoint it was quantized from" in err
    assert not (tmp_path / "plots").exists() and not (tmp_path / "adapter").exists()


def test_any_quantization_config_refused(tmp_path, capsys):
    base = tiny_models.llama()
    base.save_pretrained(tmp_path / "base")
    fine_tuned(base).save_pretrained(tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(
        capsys, "analyze", "--base", tmp_path / "base", "--finetuned", tmp_path / "gptq"
    )
    assert code == 2 and f"{tmp_path / 'gptq'} holds a model quantized with gptq" in err


@pytest.mark.parametrize(
    "settings",
    [
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
    ],
)
def test_a_float_checkpoint_with_a_leftover_bnb_config_is_analysed_as_without_it(
    tmp_path, capsys, settings
):
    """A QLoRA fine-tune merged to 16-bit often keeps its quantization_config while its files
    hold float weights (transformers loads them as floats): the report equals the same pair's
    without the key (regression review C of 833b91a, which refused it)."""
    base = tiny_models.llama()
    base.save_pretrained(tmp_path / "base")
    fine_tuned(base).save_pretrained(tmp_path / "plain")
    fine_tuned(base).save_pretrained(tmp_path / "left")
    config = json.loads((tmp_path / "left" / "config.json").read_text())
    config["quantization_config"] = settings
    (tmp_path / "left" / "config.json").write_text(json.dumps(config))
    reports = []
    for name in ("plain", "left"):
        code, out, err = _run(
            capsys, "analyze", "--base", tmp_path / "base", "--finetuned", tmp_path / name
        )
        assert code == 0, err
        reports.append(out.replace(str(tmp_path / name), "DIR"))
    assert reports[0] == reports[1]


# --- 3: parameters only one model has ---------------------------------------------------------


@pytest.fixture(scope="module")
def block_dirs(tmp_path_factory):
    """Llamas of 2 and 3 blocks (the first two blocks and the rest shared), each fine-tuned."""
    root = tmp_path_factory.mktemp("blocks")
    two, three = _llama(2), _llama(3, seed=1)
    three.load_state_dict(two.state_dict(), strict=False)  # (block 2 stays its own)
    for name, model in (("two", two), ("three", three)):
        model.save_pretrained(root / name)
        fine_tuned(model).save_pretrained(root / f"{name}_tuned")
    return root


@pytest.mark.parametrize("base, tuned", [("two", "three_tuned"), ("three", "two_tuned")])
def test_parameters_of_one_model_only_are_listed(block_dirs, tmp_path, capsys, base, tuned):
    base_weights, tuned_weights = _weights(block_dirs / base), _weights(block_dirs / tuned)
    only = {
        **{name: "base" for name in base_weights.keys() - tuned_weights.keys()},
        **{name: "fine-tuned" for name in tuned_weights.keys() - base_weights.keys()},
    }
    assert len(only) == 9  # (7 linear weights and 2 norms of block 2)
    pair = ["--base", block_dirs / base, "--finetuned", block_dirs / tuned]

    code, out, _ = _run(capsys, "analyze", *pair, "--json")
    report = json.loads(out)
    listed = {entry["name"]: entry for entry in report["left_out"] if "only_in" in entry}
    assert {name: entry["only_in"] for name, entry in listed.items()} == only
    for name, entry in listed.items():
        shape = (base_weights if only[name] == "base" else tuned_weights)[name].shape
        assert entry["shape"] == list(shape)
    for layer in report["layers"]:  # the shared layers' spectra are still right
        delta = (
            tuned_weights[layer["name"] + ".weight"].double()
            - base_weights[layer["name"] + ".weight"].double()
        )
        oracle = _singular_values(delta)
        np.testing.assert_allclose(layer["singular_values"], oracle[:64], rtol=1e-10, atol=1e-12)
    shared = base_weights.keys() & tuned_weights.keys()
    changed = {n for n in shared if not torch.equal(base_weights[n], tuned_weights[n])}
    assert {layer["name"] + ".weight" for layer in report["layers"]} == changed
    code, out, _ = _run(capsys, "analyze", *pair)
    assert code == 0 and "left out (in one model only" in out
    assert "model.layers.2.self_attn.q_proj.weight: only in the" in out

    code, out, _ = _run(
        capsys, "extract", *pair, "--output", tmp_path / "a", "--rank", "2", "--json"
    )
    uncaptured = json.loads(out)["uncaptured_changes"]
    assert {n: c["only_in"] for n, c in uncaptured.items() if "only_in" in c} == only
    assert all(uncaptured[name]["change"] is None for name in only)
    code, out, _ = _run(capsys, "extract", *pair, "--output", tmp_path / "b", "--rank", "2")
    assert code == 0 and "model.layers.2.mlp.up_proj.weight: only in the" in out


def test_only_one_sided_differences_named_in_the_refusal(block_dirs, capsys):
    """Blocks 0-1 equal, block 2 only in the fine-tune: nothing to compare, the extra block
    named in the refusal."""
    code, _, err = _run(
        capsys, "analyze", "--base", block_dirs / "two", "--finetuned", block_dirs / "three"
    )
    assert code == 2 and "no linear layer differs" in err
    assert "9 parameter(s) only in the fine-tuned model (model.layers.2." in err


# --- 5: a convolution adapter -----------------------------------------------------------------


def test_conv2d_adapter_named_as_unsupported(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    config = LoraConfig(r=2, target_modules=["conv", "lin"], init_lora_weights=False)
    get_peft_model(Net(), config).save_pretrained(tmp_path / "conv")
    code, _, err = _run(capsys, "analyze", tmp_path / "conv")
    assert code == 2 and "a LoRA on a convolution layer" in err
    assert "A [2, 3, 3, 3]" in err and "linear / Conv1D / embedding layers only" in err


# --- 6: only a tied linear changed ------------------------------------------------------------


def test_change_in_a_tied_layer_only_explained_by_extract(tmp_path, capsys):
    base = tiny_models.gpt2()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.wte.weight.add_(0.02 * torch.randn(tuned.transformer.wte.weight.shape))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    pair = ["--base", tmp_path / "base", "--finetuned", tmp_path / "tuned"]
    code, out, _ = _run(capsys, "analyze", *pair, "--json")
    (layer,) = json.loads(out)["layers"]
    oracle = _singular_values(tuned.lm_head.weight.detach() - base.lm_head.weight.detach())
    assert layer["name"] == "lm_head"
    np.testing.assert_allclose(layer["singular_values"], oracle[:64], rtol=1e-6, atol=1e-9)
    code, _, err = _run(capsys, "extract", *pair, "--output", tmp_path / "a", "--rank", "2")
    assert code == 2 and "lm_head (tied to transformer.wte.weight)" in err
    assert "the only linear layers that differ" in err and "modules_to_save" in err
    assert not (tmp_path / "a").exists()


# --- 7: an embedding update's shape -----------------------------------------------------------


def test_embedding_update_shape_is_num_embeddings_by_dim(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from lorakit.analysis import adapter_spectra

    model = get_peft_model(
        tiny_models.llama(),
        LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "emb")
    delta = model.base_model.model.model.embed_tokens.get_delta_weight("default").detach()
    _, out, _ = _run(capsys, "analyze", tmp_path / "emb", "--json")
    (layer,) = json.loads(out)["layers"]
    assert layer["shape"] == list(delta.shape) == [128, 64]
    oracle = _singular_values(delta)
    np.testing.assert_allclose(layer["singular_values"], oracle[:4], rtol=1e-5)
    from lorakit.io import load_adapter

    ours = load_adapter(tiny_models.llama(), tmp_path / "emb")
    (spectrum,) = adapter_spectra(ours)
    assert spectrum.shape == (128, 64)
    np.testing.assert_allclose(spectrum.singular_values.numpy(), oracle[:4], rtol=1e-5)


# --- 8: an all-zero adapter -------------------------------------------------------------------


def test_zero_adapter_refused_like_identical_models(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_models.llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "zero")
    delta = model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    assert not torch.any(delta)  # (peft: B = 0, the update is zero)
    code, out, err = _run(capsys, "analyze", tmp_path / "zero")
    assert code == 2 and out == "" and "zero update s B A in every layer" in err
    tiny_models.llama().save_pretrained(tmp_path / "same")
    code, _, err = _run(
        capsys, "analyze", "--base", tmp_path / "same", "--finetuned", tmp_path / "same"
    )
    assert code == 2 and "no linear layer differs" in err


# --- 9: a layer missing from both checkpoints -------------------------------------------------


def test_layer_missing_from_both_checkpoints_blamed_on_both(tmp_path, capsys):
    base = tiny_models.llama()
    base.save_pretrained(tmp_path / "base")
    fine_tuned(base).save_pretrained(tmp_path / "tuned")
    for name in ("base", "tuned"):
        assert not any(key.startswith("score") for key in _weights(tmp_path / name))
    pair = ["--base", tmp_path / "base", "--finetuned", tmp_path / "tuned", "--task", "seq-cls"]
    _, out, _ = _run(capsys, "analyze", *pair, "--json")
    (score,) = [entry for entry in json.loads(out)["left_out"] if entry["name"] == "score"]
    assert score["checkpoint"] == "both"
    _, out, _ = _run(capsys, "analyze", *pair)
    assert "  score: in neither the base nor the fine-tuned checkpoint (newly initialised)" in out
    _, out, _ = _run(capsys, "extract", *pair, "--output", tmp_path / "a", "--rank", "2", "--json")
    note = json.loads(out)["uncaptured_changes"]["score.weight"]["note"]
    assert note.startswith("in neither the base nor the fine-tuned checkpoint")
