"""``lorakit train / eval / generate / merge`` on a tiny random Llama saved to a tmp directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import cli, data
from lorakit.errors import UserError
from lorakit.io import load_adapter
from tests import tiny_tokenizer
from tests.cli_runs import run_cli, train_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, jsonl):
    output = tmp_path_factory.mktemp("run")
    code = train_cli(
        model_dir,
        jsonl,
        output,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--r",
        "4",
        "--alpha",
        "8",
        "--target-modules",
        "q_proj,v_proj",
    )
    assert code == 0
    return output


def test_train_writes_adapter_metrics_and_curve(trained):
    assert (trained / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (trained / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_config_file_with_flag_override(tmp_path, capsys, model_dir, jsonl):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {jsonl}\nsteps: 5\nlr: 0.003\nr: 2\n"
        "target-modules: [q_proj]\nbatch_size: 4\nno_progress: true\n"
    )
    code, out, _ = run_cli(
        capsys, "train", "--config", config, "--steps", "2", "--output", tmp_path / "o"
    )
    assert code == 0
    settings = json.loads((tmp_path / "o" / "train_settings.json").read_text())
    assert settings["steps"] == 2 and settings["lr"] == 0.003 and settings["r"] == 2
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open()]
    assert len([r for r in records if "loss" in r]) == 2
    assert json.loads(out.splitlines()[0])["steps"] == 2


@pytest.fixture(scope="module")
def well_trained(tmp_path_factory, model_dir, jsonl):
    """An adapter trained long enough to get some answers exactly right (not all)."""
    output = tmp_path_factory.mktemp("run-long")
    code = train_cli(
        model_dir,
        jsonl,
        output,
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--r",
        "8",
        "--alpha",
        "16",
        "--dropout",
        "0",
    )
    assert code == 0
    return output


def test_eval_loss_matches_the_model_with_the_adapter(capsys, model_dir, jsonl, well_trained):
    trained = well_trained
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--model",
        model_dir,
        "--adapter",
        trained / "adapter",
        "--data",
        jsonl,
        "--batch-size",
        "64",
    )
    assert code == 0
    report = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(model, trained / "adapter")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = data.tokenize_examples(data.load_examples(jsonl), tokenizer, 256)
    with torch.no_grad():
        expected = model.eval()(**data.collate(tokenized, range(len(tokenized)))).loss  # HF's mean
    assert report["examples"] == 24
    assert report["loss"] == pytest.approx(float(expected), abs=1e-5)
    # exact match counted here: every answer token (and EOS) is the argmax, one example at a time
    right = 0
    for input_ids, labels in zip(tokenized.input_ids, tokenized.labels, strict=True):
        with torch.no_grad():
            predicted = model(torch.tensor([input_ids])).logits[0, :-1].argmax(-1).tolist()
        answer = [(p, t) for p, t in zip(predicted, labels[1:], strict=True) if t != -100]
        right += all(p == t for p, t in answer)
    assert report["accuracy_kind"] == "exact match of the answer tokens"
    assert report["accuracy"] == right / 24
    assert 0 < right < 24  # measured 20 of 24: a count that can be wrong both ways


def test_merge_writes_a_plain_model_with_the_adapters_outputs(tmp_path, capsys, model_dir, trained):
    code, _, _ = run_cli(
        capsys,
        "merge",
        "--model",
        model_dir,
        "--adapter",
        trained / "adapter",
        "--output",
        tmp_path / "merged",
    )
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = load_adapter(
        AutoModelForCausalLM.from_pretrained(model_dir), trained / "adapter"
    ).eval()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name in merged.state_dict())
    # generation through the CLI (adapter) equals greedy generation of the merged plain model
    code, out, _ = run_cli(
        capsys,
        "generate",
        "Is this movie review positive?",
        "--model",
        model_dir,
        "--adapter",
        trained / "adapter",
        "--max-new-tokens",
        "6",
    )
    assert code == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # trained on prompt/completion data: the prompt goes in as is, no chat template
    encoded = tokenizer("Is this movie review positive?", return_tensors="pt")
    greedy = merged.generate(
        **encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    expected = tokenizer.decode(
        greedy[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert out.rstrip("\n") == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "x"], "no training data"),
        (["train", "--data", "nope.txt", "--steps", "1"], "unknown data"),
        (["train", "--data", "rotten-tomatoes", "--steps", "0"], "--steps must be >= 1, got 0"),
        (
            ["train", "--data", "d.jsonl", "--warmup-ratio", "-1"],
            "--warmup-ratio must be in [0, 1], got -1.0",
        ),
        (
            ["train", "--data", "d.jsonl", "--keep-checkpoints", "-1"],
            "--keep-checkpoints must be a positive integer, got -1",
        ),
        (
            ["train", "--data", "d.jsonl", "--max-length", "1"],
            "--max-length must be an integer >= 2, got 1",
        ),
        (
            ["train", "--data", "d.jsonl", "--model", "minilm-l6"],
            "lorakit.models.load_model('minilm-l6', task='seq-cls', num_labels=N)",
        ),
        (
            ["demo", "--eval-size", "5000"],
            "--eval-size 5000: the Rotten Tomatoes test split holds only 1271 reviews",
        ),
        (["train", "--data", "d.jsonl", "--r", "abc"], "invalid int value"),
        (["demo", "--steps", "0"], "--steps must be >= 1"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["merge", "--adapter", "a"], "required"),
    ],
)
def test_wrong_arguments_give_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_json_config_file_with_flag_override(tmp_path, capsys, model_dir, jsonl):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "model": str(model_dir),
                "data": str(jsonl),
                "steps": 5,
                "lr": 0.004,
                "r": 2,
                "alpha": 6,
                "target-modules": ["q_proj", "v_proj"],
                "batch_size": 4,
                "no_progress": True,
            }
        )
    )
    code, out, _ = run_cli(
        capsys, "train", "--config", config, "--steps", "3", "--output", tmp_path / "o"
    )
    assert code == 0
    settings = json.loads((tmp_path / "o" / "train_settings.json").read_text())
    assert (settings["steps"], settings["lr"], settings["r"], settings["batch_size"]) == (
        3,
        0.004,
        2,
        4,
    )
    adapter = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (2, 6)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["lr"] == pytest.approx(0.004)  # warmup ceil(0.05 * 3) = 1 step: (0+1)/1
    assert json.loads(out.splitlines()[0])["steps"] == 3


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_that_is_not_utf8_names_file_and_line(tmp_path, capsys, suffix):
    config = tmp_path / f"run{suffix}"
    lines = (
        ["data: reviews.jsonl", "model: caf\xe9"]
        if suffix == ".yaml"
        else ["{", '"model": "caf\xe9"}']
    )
    config.write_bytes("\n".join(lines).encode("latin-1"))
    code, _, err = run_cli(capsys, "train", "--config", config)
    assert code == 2 and err.count("\n") == 1
    assert f"{config}:2: not valid UTF-8 (byte 0xe9)" in err


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x.jsonl\nlearning_rate: 1\n")
    code, _, err = run_cli(capsys, "train", "--config", bad)
    assert code == 2 and "unknown setting(s) ['learning_rate']" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "does not exist" in err
    for line, message in (
        ("lr: fast", "lr: 'fast' is not a number"),
        ("r: 2.5", "r: 2.5 is not an integer"),
        ("steps: true", "steps: True is not an integer"),
        ("resume: 'false'", "resume: 'false' is not true or false"),
        ("no_progress: 'no'", "no_progress: 'no' is not true or false"),
        ("model: 7", "model: 7 is not a string (quote it)"),
        ("output: [x]", "output: ['x'] is not a string"),
        ("target_modules: {q: 1}", "target_modules: {'q': 1} is not a string or a list"),
        ("lr: .inf", "--lr must be a finite number > 0, got inf"),
        ("epochs: .inf", "--epochs must be a finite number > 0"),
        ("weight_decay: .nan", "--weight-decay must be a finite number >= 0, got nan"),
        ("quantization: int8-rows", "quantization: 'int8-rows' is not one of nf4, fp4, int8"),
    ):
        bad.write_text(f"data: x.jsonl\n{line}\n")
        code, _, err = run_cli(capsys, "train", "--config", bad)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads ``2e-4`` as a string; the config file still means 0.0002."""
    config = tmp_path / "run.yaml"
    config.write_text("data: x.jsonl\nlr: 2e-4\nr: '8'\nalpha: 16\nsteps: 3\n")
    from lorakit.train.config_file import load_config_file

    loaded = load_config_file(config)
    assert loaded["lr"] == 2e-4 and isinstance(loaded["lr"], float)
    assert loaded["r"] == 8 and loaded["alpha"] == 16.0 and isinstance(loaded["alpha"], float)
    assert loaded["steps"] == 3 and loaded["data"] == "x.jsonl"


def test_help_of_every_command_lists_its_options(capsys):
    for command, options in {
        "train": [
            "--config",
            "--model",
            "--data",
            "--target-modules",
            "--r",
            "--alpha",
            "--dropout",
            "--lr",
            "--steps",
            "--epochs",
            "--batch-size",
            "--grad-accum",
            "--max-length",
            "--output",
            "--eval-every",
            "--checkpoint-every",
            "--resume",
            "--loraplus-ratio",
            "--seed",
            "--gradient-checkpointing",
        ],
        "eval": ["--model", "--adapter", "--data", "--split"],
        "generate": ["--model", "--adapter", "--max-new-tokens", "--raw"],
        "merge": ["--model", "--adapter", "--output"],
        "demo": ["--output", "--steps", "--eval-size"],
    }.items():
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        for option in options:
            assert option in out, (command, option)


def test_adapter_on_another_base_is_refused_unless_the_flag_is_given(
    tmp_path, capsys, model_dir, jsonl, trained
):
    other = tmp_path / "other-llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # same shapes, other weights
    model.save_pretrained(other)
    tiny_tokenizer.build().save_pretrained(other)
    argv = ["--model", other, "--adapter", trained / "adapter", "--data", jsonl]
    code, _, err = run_cli(capsys, "eval", *argv)
    assert code == 2 and "trained on different base weights" in err
    assert "pass --allow-base-mismatch to load it anyway" in err and "=True" not in err
    code, out, err = run_cli(capsys, "eval", *argv, "--allow-base-mismatch")
    assert code == 0 and json.loads(out)["examples"] == 24
    code, _, err = run_cli(capsys, "merge", *argv[:4], "--output", tmp_path / "merged")
    assert code == 2 and "--allow-base-mismatch" in err


def _refuse_to_load(monkeypatch):
    """Make any model load fail loudly: errors must come before it."""
    import lorakit.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(lorakit.models, "load_model", load_model)


def test_errors_found_before_the_model_loads(tmp_path, capsys, monkeypatch, model_dir, jsonl):
    _refuse_to_load(monkeypatch)
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        model_dir,
        "--data",
        jsonl,
        "--target-modules",
        "nosuch",
        "--output",
        tmp_path / "o",
    )
    assert code == 2 and "nosuch" in err and "matched no module" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        model_dir,
        "--data",
        jsonl,
        "--target-modules",
        "input_layernorm",
        "--output",
        tmp_path / "o",
    )
    assert code == 2 and "input_layernorm" in err and "cannot adapt" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run_cli(capsys, "plan", model_dir, "--target-modules", "input_layernorm")
    assert code == 2 and "cannot adapt" in err and err.count("\n") == 1
    for command in (
        ["eval", "--data", jsonl],
        ["generate", "hi"],
        ["merge", "--output", tmp_path / "m"],
    ):
        code, _, err = run_cli(capsys, *command, "--model", model_dir, "--adapter", tmp_path / "no")
        assert code == 2 and f"adapter directory {tmp_path / 'no'} does not exist" in err
    file = tmp_path / "a-file"
    file.write_text("x")
    for command in (["merge", "--adapter", tmp_path / "no"], ["train", "--data", jsonl]):
        code, _, err = run_cli(capsys, *command, "--model", model_dir, "--output", file)
        assert code == 2 and f"--output {file} is a file" in err and err.count("\n") == 1
    assert file.read_text() == "x"


def test_model_directory_without_tokenizer_is_one_line(tmp_path, capsys, model_dir):
    no_tokenizer = tmp_path / "weights-only"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(no_tokenizer)
    capsys.readouterr()  # the bar of the load just above
    code, _, err = run_cli(capsys, "generate", "hi", "--model", no_tokenizer)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"model directory '{no_tokenizer}' has no tokenizer files" in err


def test_cli_hides_the_weight_loading_bar_and_restores_it(capsys, model_dir):
    from transformers.utils import logging as transformers_logging

    from lorakit.models import load_model

    load_model(model_dir)  # the Python API shows transformers' bar by default
    assert "Loading weights" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "generate", "hi", "--model", model_dir, "--max-new-tokens", "2")
    assert code == 0 and "Loading weights" not in err
    assert transformers_logging.is_progress_bar_enabled()  # switched back on afterwards


def test_every_option_of_every_command_has_help_with_one_default():
    import argparse

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "eval", "generate", "merge", "demo", "plan", "serve"} <= set(commands.choices)
    for name, command in commands.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = (name, action.option_strings or action.dest)
            assert action.help and action.help != argparse.SUPPRESS, where
            text = formatter._expand_help(action)
            assert len(text.strip()) > 10, where
            assert text.lower().count("default") <= 1 and "None" not in text, (where, text)


def test_a_second_run_into_the_same_output_is_refused_until_overwrite(
    tmp_path, capsys, model_dir, jsonl
):
    argv = [
        "train",
        "--model",
        model_dir,
        "--data",
        jsonl,
        "--output",
        tmp_path / "o",
        "--batch-size",
        "4",
        "--r",
        "2",
        "--no-progress",
    ]
    assert run_cli(capsys, *argv, "--steps", "3", "--checkpoint-every", "3")[0] == 0
    code, _, err = run_cli(capsys, *argv, "--steps", "2")
    assert code == 2 and err.count("\n") == 1
    assert "holds a previous training run (adapter/, checkpoints/, metrics.jsonl)" in err
    code, _, err = run_cli(capsys, *argv, "--steps", "2", "--resume", "--overwrite")
    assert code == 2 and "give one" in err
    code, out, _ = run_cli(capsys, *argv, "--steps", "2", "--overwrite")
    assert code == 0 and json.loads(out.splitlines()[0])["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # no zig-zag: the old run is gone
    assert not (tmp_path / "o" / "checkpoints").exists()
    assert json.loads((tmp_path / "o" / "train_settings.json").read_text())["steps"] == 2


def test_train_gives_the_same_adapter_whether_or_not_the_model_was_in_the_cache(
    tmp_path, capsys, jsonl, tiny_builtin_model
):
    from safetensors.torch import load_file

    adapters = []
    for run in ("converted", "cached"):
        code, _, _ = run_cli(
            capsys,
            "train",
            "--data",
            jsonl,
            "--output",
            tmp_path / run,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--r",
            "2",
            "--no-progress",
        )
        assert code == 0
        adapters.append(load_file(tmp_path / run / "adapter" / "adapter_model.safetensors"))
    assert len(tiny_builtin_model) == 1  # converted once, then read from the cache
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 28
    for key, tensor in adapters[0].items():
        assert torch.equal(adapters[1][key], tensor), key


def test_allowed_base_mismatch_is_one_notice_saying_the_check_was_overridden(
    tmp_path, capsys, model_dir, jsonl, trained
):
    import warnings

    other = tmp_path / "other-llama"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    model.save_pretrained(other)
    tiny_tokenizer.build().save_pretrained(other)
    capsys.readouterr()  # the bar of the save just above
    argv = ["--model", other, "--adapter", trained / "adapter", "--allow-base-mismatch"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(capsys, "eval", *argv, "--data", jsonl)
    assert code == 0 and json.loads(out)["examples"] == 24
    assert [str(w.message) for w in caught] == []  # no raw Python warning with a file path
    (line,) = err.splitlines()
    assert line.startswith(f"lorakit: warning: adapter {trained / 'adapter'} was trained on ")
    assert "module 'model.layers.0.self_attn.q_proj'" in line
    assert line.endswith("loaded anyway: --allow-base-mismatch overrode the check")
    assert "allow_base_mismatch=True" not in line and ".py:" not in line
    # the Python API says the same with its own spelling
    with pytest.warns(UserWarning) as recorded:
        load_adapter(
            AutoModelForCausalLM.from_pretrained(other),
            trained / "adapter",
            allow_base_mismatch=True,
        )
    (message,) = [str(w.message) for w in recorded if "base weights" in str(w.message)]
    assert message.endswith("loaded anyway: allow_base_mismatch=True overrode the check")
    assert "pass allow_base_mismatch" not in message


def test_merge_shows_no_progress_bars(tmp_path, capsys, model_dir, trained):
    code, out, err = run_cli(
        capsys,
        "merge",
        "--model",
        model_dir,
        "--adapter",
        trained / "adapter",
        "--output",
        tmp_path / "merged",
    )
    assert (
        code == 0 and out == f"merged model (float32) saved to {(tmp_path / 'merged').resolve()}\n"
    )
    assert err == ""  # neither "Loading weights" nor "Writing model shards"


def test_version(capsys):
    import lorakit

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lorakit {lorakit.__version__}\n"


def test_argument_errors_name_the_command_once(capsys):
    code, _, err = run_cli(capsys, "train", "--r", "abc")
    assert code == 2 and "lorakit: error: lorakit" not in err
    assert err == (
        "lorakit: error: train: argument --r/--rank: invalid int value: 'abc' "
        "(see 'lorakit train --help')\n"
    )
    code, _, err = run_cli(capsys, "nosuch")
    assert code == 2 and err.startswith(
        "lorakit: error: argument COMMAND: invalid choice: 'nosuch'"
    )
    assert err.endswith("(see 'lorakit --help')\n")


def test_no_help_text_shows_a_doubled_percent_sign():
    import argparse

    commands = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for name, command in commands.choices.items():
        assert "%%" not in command.format_help(), name


def test_train_prints_a_summary_and_counts_the_shortened_examples(
    tmp_path, capsys, model_dir, jsonl
):
    argv = [
        "train",
        "--model",
        model_dir,
        "--data",
        jsonl,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--r",
        "2",
        "--target-modules",
        "q_proj,v_proj",
        "--no-progress",
    ]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "long")
    # r (in + out) per module, 2 layers: q_proj 64 -> 64, v_proj 64 -> 32 (2 KV heads of 16)
    trainable = 2 * (2 * (64 + 64) + 2 * (64 + 32))
    total = trainable + sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()
    )
    capsys.readouterr()
    assert code == 0 and err.splitlines() == [
        f"lorakit: training on 24 examples, 3 optimizer steps of 4 examples, {trainable:,} "
        f"trainable parameters ({100 * trainable / total:.2f}% of {total:,})"
    ]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "short", "--max-length", "6")
    assert code == 0 and err.splitlines()[0] == (
        "lorakit: warning: 24 of 24 training examples are longer than --max-length 6 tokens and "
        "were shortened; raise --max-length to train on them whole"
    )


def test_every_train_option_is_a_settings_field_spelled_once(tmp_path):
    """The parser's options are exactly the ``setting`` fields of TrainSettings and
    TrainingConfig; a flag's value reaches its field, aliases included."""
    import argparse
    from dataclasses import fields

    from lorakit.train.config import TrainingConfig
    from lorakit.train.config_file import merged_values
    from lorakit.train.settings import (
        TrainSettings,
        build_settings,
        option_fields,
        setting_key,
    )

    commands = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    parser = commands.choices["train"]
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert set(flags) - {"-h", "--config"} == {
        f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in option_fields()
    }
    assert flags["--r"].option_strings == ["--r", "--rank"]
    assert {f.name for f in option_fields()} >= {f.name for f in fields(TrainSettings)}
    assert "warmup_steps" not in {f.name for f in option_fields()}  # not every field is a flag
    argv = [
        "--data",
        "d.jsonl",
        "--rank",
        "4",
        "--steps",
        "7",
        "--output",
        str(tmp_path / "o"),
        "--no-progress",
        "--gradient-checkpointing",
        "--lr",
        "0.01",
    ]
    values = merged_values(None, vars(parser.parse_args(argv)))
    assert {setting_key(f) for f in option_fields()} == set(values)
    job, training = build_settings(values)
    assert (job.r, job.data, job.target_modules) == (4, "d.jsonl", "all-linear")
    assert training == TrainingConfig(
        output_dir=str(tmp_path / "o"),
        max_steps=7,
        lr=0.01,
        progress=False,
        gradient_checkpointing=True,
    )


def test_lora_bias_and_trainable_token_flags_reach_the_saved_adapter(
    tmp_path, capsys, model_dir, jsonl
):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    seen = AutoTokenizer.from_pretrained(model_dir)("Review: good film\nSentiment:").input_ids
    ids = sorted(set(seen))[:3]  # tokens every training example holds: their rows get gradients
    code = train_cli(
        model_dir,
        jsonl,
        tmp_path / "o",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--target-modules",
        "q_proj",
        "--lora-bias",
        "--trainable-token-indices",
        ",".join(map(str, ids)),
    )
    assert code == 0
    adapter = tmp_path / "o" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["trainable_token_indices"] == ids
    tensors = load_file(adapter / "adapter_model.safetensors")
    biases = [k for k in tensors if k.endswith(".lora_B.bias")]
    assert len(biases) == 2 and all(tensors[k].abs().max() > 0 for k in biases)  # trained
    rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    embedding = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight
    assert rows.shape == (3, embedding.shape[1])
    assert not torch.equal(rows, embedding[ids].detach())  # the rows trained
    settings = json.loads((tmp_path / "o" / "train_settings.json").read_text())
    assert settings["lora_bias"] is True and settings["trainable_token_indices"] == ",".join(
        map(str, ids)
    )


def test_trainable_token_indices_from_a_config_file_and_a_bad_value(
    tmp_path, capsys, model_dir, jsonl
):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model_dir}\ndata: {jsonl}\nsteps: 1\nbatch_size: 4\nno_progress: true\n"
        "target-modules: [q_proj]\ntrainable_token_indices: [4, 9]\n"
    )
    code, _, _ = run_cli(capsys, "train", "--config", config, "--output", tmp_path / "o")
    assert code == 0
    adapter = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == [4, 9]
    code, _, err = run_cli(
        capsys,
        "train",
        "--config",
        config,
        "--trainable-token-indices",
        "4,x",
        "--output",
        tmp_path / "p",
    )
    assert code == 2 and "--trainable-token-indices takes comma-separated token ids" in err
    assert "'4,x'" in err


def test_overwrite_deletes_the_previous_run_only_once_the_data_tokenized(
    tmp_path, capsys, model_dir, jsonl, monkeypatch
):
    """A check that needs the tokenizer (a chat template refusing an example, say) fails after
    the model loads: --overwrite must not have deleted the previous run by then."""
    argv = ["train", "--model", model_dir, "--data", jsonl, "--output", tmp_path / "o"]
    argv += ["--batch-size", "4", "--r", "2", "--no-progress", "--steps", "2"]
    assert run_cli(capsys, *argv)[0] == 0
    before = sorted(p.name for p in (tmp_path / "o").iterdir())

    def refuse(*args, **kwargs):
        raise UserError("reviews.jsonl:3: the model's chat template refused the messages")

    monkeypatch.setattr(data, "tokenize_examples", refuse)
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 2 and "chat template refused" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_resume_with_another_lr_is_refused_and_the_runs_record_kept(
    tmp_path, capsys, model_dir, jsonl
):
    argv = ["train", "--model", model_dir, "--data", jsonl, "--output", tmp_path / "o"]
    argv += ["--batch-size", "4", "--r", "2", "--no-progress", "--steps", "4"]
    assert run_cli(capsys, *argv, "--checkpoint-every", "2", "--lr", "1e-2")[0] == 0
    code, _, err = run_cli(capsys, *argv, "--resume", "--lr", "1e-3")
    assert code == 2 and "--lr 0.001 (the checkpoint's: 0.01)" in err
    record = tmp_path / "o" / "train_settings.json"
    assert f"--config {record} --resume repeats them" in err
    assert json.loads(record.read_text())["lr"] == 1e-2  # the run's own settings, kept
    code, out, _ = run_cli(capsys, "train", "--config", record, "--resume")
    assert code == 0 and json.loads(out.splitlines()[0])["steps"] == 4
