"""``lorakit train --quantization``: a QLoRA run on the tiny Llama (bitsandbytes NF4 base), and
the refusals that come before any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
import lorakit.models
from lorakit import cli
from lorakit.io import load_adapter, read_adapter
from lorakit.models import load_model
from tests import tiny_models
from tests.cli_runs import demo_settings, train_cli


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, model_dir, jsonl):
    """A 2-step ``lorakit train --quantization nf4`` run on the tiny Llama."""
    output = tmp_path_factory.mktemp("qlora") / "run"
    settings = "--steps 2 --batch-size 4 --lr 1e-2 --r 4 --alpha 8 --quantization nf4"
    code = train_cli(model_dir, jsonl, output, *settings.split())
    assert code == 0
    return output


@pytest.mark.slow
def test_train_on_an_nf4_base_saves_an_adapter_bound_to_it(qlora_run, model_dir):
    assert json.loads((qlora_run / "train_settings.json").read_text())["quantization"] == "nf4"
    fingerprints = read_adapter(qlora_run / "adapter").fingerprint
    assert {entry["dtype"] for entry in fingerprints.values()} == {"bnb-nf4-dq"}
    assert len(fingerprints) == 14  # "all-linear": the 7 projections of both blocks
    model, tokenizer = load_model(model_dir, quantization="nf4", progress=False)
    load_adapter(model, qlora_run / "adapter")
    trained = [p for key, p in model.named_parameters() if ".lora_B." in key]
    assert trained and all(p.abs().max() > 0 for p in trained)  # the steps moved B off zero
    ids = tiny_models.input_ids(vocab=len(tokenizer))
    with torch.no_grad():
        assert torch.isfinite(model.train()(ids).logits).all()


@pytest.mark.slow
def test_eval_and_merge_take_the_quantization_the_adapter_was_trained_on(
    qlora_run, model_dir, jsonl, capsys, tmp_path
):
    adapter = qlora_run / "adapter"
    code = cli.main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapter),
            "--data",
            str(jsonl),
            "--limit",
            "4",
            "--quantization",
            "nf4",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "warning" not in captured.err and '"loss"' in captured.out
    code = cli.main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapter),
            "--data",
            str(jsonl),
            "--limit",
            "4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "trained on a bnb-nf4-dq base, this base is float32" in err
    merged = tmp_path / "merged"
    code = cli.main(
        [
            "merge",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapter),
            "--output",
            str(merged),
            "--quantization",
            "nf4",
        ]
    )
    assert code == 0
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize(
    ("quantization", "message"),
    [("gguf", "no GGUF file"), ("q3", "invalid choice: 'q3'")],
)
def test_a_quantization_that_cannot_apply_is_refused_before_loading(
    tmp_path, capsys, monkeypatch, model_dir, jsonl, quantization, message
):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(lorakit.models, "load_model", refuse)
    output = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--data", jsonl, "--output", output]
    code = cli.main([str(a) for a in [*argv, "--quantization", quantization]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not output.exists()


@pytest.mark.slow
def test_the_demo_runs_on_an_nf4_base_and_its_float_merge_agrees(tmp_path, model_dir, capsys):
    from lorakit.demo import run_demo

    settings = demo_settings(tmp_path / "demo", model_dir, quantization="nf4")
    summary = run_demo(settings)
    assert summary["settings"]["quantization"] == "nf4"
    assert summary["merged_predictions_agree"] == 8
    assert summary["merged_max_abs_logprob_difference"] < 1e-4
    float_model, _ = load_model(model_dir, progress=False)
    assert summary["base_parameters"] == sum(p.numel() for p in float_model.parameters())


def _adapter_on(model_dir, directory, **fields):
    """An adapter of ``fields`` (B non-zero) saved from the tiny model in ``model_dir``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, **fields))
    tiny_models.randomize_adapters(model, std=0.1)
    lorakit.save_adapter(model, directory)
    return directory


def test_an_adapter_a_quantized_layer_cannot_take_is_one_line(model_dir, tmp_path, capsys):
    """A DoRA adapter on an int8-rows base: was a ValueError traceback with inject's advice."""
    adapter = _adapter_on(model_dir, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    capsys.readouterr()
    argv = ["generate", "hi", "--model", str(model_dir), "--adapter", str(adapter)]
    assert cli.main([*argv, "--quantization", "int8-rows", "--allow-base-mismatch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit: error: cannot load adapter {adapter} on ")
    assert "(--quantization int8-rows)" in err and "DoRA" in err and err.count("\n") == 1


def test_a_full_copy_of_a_quantized_output_layer_is_named(model_dir, tmp_path, capsys):
    """modules_to_save=["lm_head"] on int8-rows (which quantizes the output layer): was "lacks
    tensors ... lm_head.codes ... The file is incomplete, or the model is not its base"."""
    adapter = _adapter_on(
        model_dir, tmp_path / "head", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    capsys.readouterr()
    argv = ["generate", "hi", "--model", str(model_dir), "--adapter", str(adapter)]
    assert cli.main([*argv, "--quantization", "int8-rows"]) == 2
    err = capsys.readouterr().err
    assert "keeps a full float copy of 'lm_head' (modules_to_save)" in err
    assert "quantized (int8-rows" in err and "incomplete" not in err
