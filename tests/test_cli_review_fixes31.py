"""CLI review fixes (session 31): ``null`` in a train config file only for a setting that may
be unset, else one line naming the file and key before anything loads; ``--seed`` outside what
torch takes and a huge ``--r`` are one-line refusals naming the flag; ``--config DIR`` says it
is a directory; the config key ``rank`` is ``r`` (as ``--rank`` is ``--r``); ``lorakit combine``
prints its warnings as ``lorakit: warning:`` lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lorakit
from lorakit.commands import combine as combine_command
from lorakit.errors import UserError
from lorakit.train.config import SEED_RANGE, SettingError, TrainingConfig
from lorakit.train.config_file import load_config_file, merged_values
from lorakit.train.settings import MAX_RANK, build_settings
from tests.cli_runs import run_cli, train_cli
from tests.tiny_models import gpt2, llama, randomize_adapters


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------- 1. null in a config file


@pytest.mark.parametrize(
    "key, expected",
    [
        ("output", "output: null is not a string; leave the key out for the default (lorakit-run)"),
        ("dtype", "dtype: null is not one of float32, bfloat16, float16"),
        ("warmup_ratio", "warmup_ratio: null is not a number; leave the key out for the default"),
        ("seed", "seed: null is not an integer; leave the key out for the default (0)"),
        ("weight_decay", "weight_decay: null is not a number"),
        ("model", "model: null is not a string"),
        ("use_dora", "use_dora: null is not true or false; leave the key out for the default"),
        ("no_progress", "no_progress: null is not true or false"),
        ("target_modules", "target_modules: null is not a string or a list"),
    ],
)
def test_null_for_a_setting_that_cannot_be_unset_is_one_line_before_anything_is_written(
    tmp_path, capsys, model_dir, jsonl, key, expected
):
    config = _config(tmp_path, f"model: {model_dir}\ndata: {jsonl}\nsteps: 1\nr: 2\n{key}: null\n")
    output = tmp_path / "out"
    flags = [] if key == "output" else ["--output", output]
    code, out, err = run_cli(capsys, "train", "--config", config, *flags)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"lorakit: error: config file {config}: {expected}")
    assert not output.exists()  # (weight_decay: null used to fail after writing settings)
    assert not (tmp_path / "lorakit-run").exists()


def test_null_is_kept_for_the_settings_that_may_be_unset(tmp_path):
    config = _config(
        tmp_path,
        "data: x.jsonl\nmax_grad_norm: null\nsteps: null\neval_data: null\nquantization: null\n"
        "loraplus_ratio: null\ntrainable_token_indices: null\nstyle: null\n",
    )
    loaded = load_config_file(config)
    assert loaded == {
        "data": "x.jsonl",
        "max_grad_norm": None,
        "steps": None,
        "eval_data": None,
        "quantization": None,
        "loraplus_ratio": None,
        "trainable_token_indices": None,
        "style": None,
    }
    values = merged_values(str(config), {})
    assert values["max_grad_norm"] is None  # null turns clipping off (the default is 1.0)
    _, training = build_settings({**values, "output": str(tmp_path / "out")})
    assert training.max_grad_norm is None and training.max_steps is None


def test_null_in_a_json_config_file_names_the_file_and_key(tmp_path):
    config = _config(tmp_path, json.dumps({"data": "x.jsonl", "lr": None}), "run.json")
    with pytest.raises(UserError) as caught:
        load_config_file(config)
    assert str(caught.value) == (
        f"config file {config}: lr: null is not a number; leave the key out for the default "
        "(0.0002)"
    )


# ------------------------------------------------- 2. --seed range, a huge --r


@pytest.mark.parametrize("seed", [2**64, 2**64 - 1, 2**63, -(2**63) - 1])
def test_train_seed_outside_the_range_is_refused_naming_the_flag(
    tmp_path, capsys, model_dir, jsonl, seed
):
    """2**64: torch cannot take it ("Overflow when unpacking long long"); 2**63 .. 2**64 - 1:
    torch takes it but not ``seed + epoch`` / ``seed + rank + step``, which the loop seeds."""
    output = tmp_path / "out"
    code = train_cli(model_dir, jsonl, output, "--steps", "1", "--seed", str(seed))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"lorakit: error: --seed must be an integer in [-2**63, 2**63 - 1], got {seed}\n"
    assert not output.exists()


def test_the_training_seed_range_leaves_room_for_the_loop_sums():
    assert SEED_RANGE == (-(2**63), 2**63 - 1)
    assert TrainingConfig(seed=2**63 - 1).seed == 2**63 - 1
    assert TrainingConfig(seed=-(2**63)).seed == -(2**63)
    with pytest.raises(SettingError, match=r"seed must be an integer in \[-2\*\*63"):
        TrainingConfig(seed=2**63)
    with pytest.raises(SettingError, match=r"seed must be an integer, got 1\.5"):
        TrainingConfig(seed=1.5)


def test_train_at_the_largest_seed_runs_two_epochs(tmp_path, capsys, model_dir, jsonl):
    """``seed + epoch`` (the second epoch's batches) stays within torch's range."""
    output = tmp_path / "out"
    code = train_cli(
        model_dir,
        jsonl,
        output,
        "--epochs",
        "2",
        "--batch-size",
        "12",
        "--r",
        "2",
        "--seed",
        str(2**63 - 1),
    )
    assert code == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert [record["step"] for record in steps if "loss" in record] == [1, 2, 3, 4]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_generate_seed_outside_torch_range_is_refused_naming_the_flag(capsys, model_dir, seed):
    code, out, err = run_cli(capsys, "generate", "hi", "--model", model_dir, "--seed", seed)
    assert code == 2 and out == ""
    assert err == f"lorakit: error: --seed must be an integer in [-2**63, 2**64 - 1], got {seed}\n"


def test_generate_takes_torch_whole_seed_range(capsys, model_dir):
    from lorakit.serve.sampling import SEED_RANGE as SERVE_SEED_RANGE

    assert SERVE_SEED_RANGE == (-(2**63), 2**64 - 1)  # generate checks --seed against it
    for seed in (2**64 - 1, -(2**63)):
        code, _, err = run_cli(
            capsys,
            "generate",
            "hi",
            "--model",
            model_dir,
            "--raw",
            "--seed",
            seed,
            "--temperature",
            "1",
            "--max-new-tokens",
            "2",
        )
        assert code == 0, err


def test_a_huge_rank_is_one_line_naming_r(tmp_path, capsys, model_dir, jsonl):
    output = tmp_path / "out"
    code = train_cli(model_dir, jsonl, output, "--steps", "1", "--r", "99999999999999999999")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("lorakit: error: --r must be at most 65536 (")
    assert err.endswith("got 99999999999999999999\n") and "frame" not in err
    assert not output.exists()


def test_the_rank_bound(tmp_path):
    assert MAX_RANK == 2**16
    values = merged_values(None, {"data": "x.jsonl", "output": str(tmp_path / "out")})
    job, _ = build_settings({**values, "r": MAX_RANK})
    assert job.r == MAX_RANK
    with pytest.raises(UserError, match=f"--r must be at most 65536 .*, got {MAX_RANK + 1}$"):
        build_settings({**values, "r": MAX_RANK + 1})


# ------------------------------------------------- 3. --config DIR


def test_config_given_a_directory_says_so(tmp_path, capsys):
    directory = tmp_path / "run.yaml"
    directory.mkdir()
    code, _, err = run_cli(capsys, "train", "--config", directory)
    assert code == 2
    assert err == (
        f"lorakit: error: config file {directory} is a directory; --config takes a YAML or JSON "
        "file\n"
    )


# ------------------------------------------------- 5. the key rank


def test_the_config_key_rank_is_r(tmp_path, capsys, model_dir, jsonl):
    config = _config(tmp_path, f"model: {model_dir}\ndata: {jsonl}\nsteps: 1\nrank: 4\n")
    assert load_config_file(config) == {
        "model": str(model_dir),
        "data": str(jsonl),
        "steps": 1,
        "r": 4,
    }
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--config", config, "--output", output, "--no-progress")
    assert code == 0, err
    assert json.loads((output / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((output / "train_settings.json").read_text())["r"] == 4
    assert merged_values(str(config), {"r": 6})["r"] == 6  # --rank / --r override the file


def test_r_and_rank_in_one_file(tmp_path):
    same = _config(tmp_path, "data: x.jsonl\nr: 4\nrank: '4'\n", "same.yaml")
    assert load_config_file(same)["r"] == 4
    both = _config(tmp_path, "data: x.jsonl\nr: 4\nrank: 8\n", "both.yaml")
    with pytest.raises(UserError) as caught:
        load_config_file(both)
    assert str(caught.value) == (
        f"config file {both}: r: 4 and rank: 8 are two values of one setting (r); give one of them"
    )
    with pytest.raises(UserError, match=r"rank: null is not an integer"):
        load_config_file(_config(tmp_path, "data: x.jsonl\nrank: null\n", "null.yaml"))


def test_unknown_keys_list_the_aliases(tmp_path):
    with pytest.raises(UserError, match=r"unknown setting\(s\) \['ranks'\]; known: .*\(and rank "):
        load_config_file(_config(tmp_path, "data: x.jsonl\nranks: 4\n"))


# ------------------------------------------------- 6. combine's warnings


@pytest.fixture
def adapters_of_two_bases(tmp_path):
    directories = []
    for name, model, targets in (("llama", llama(), ["q_proj"]), ("gpt2", gpt2(), ["c_attn"])):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=targets))
        randomize_adapters(model, seed=3, std=0.2)
        lorakit.save_adapter(model, tmp_path / name)
        directories.append(tmp_path / name)
    return directories


@pytest.mark.slow  # (a subprocess: Python's own warning display, which pytest replaces)
def test_combine_prints_a_warning_as_one_lorakit_line(tmp_path, adapters_of_two_bases):
    output = tmp_path / "combined"
    source = Path(lorakit.__file__).parents[1]
    environment = os.environ | {"PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    environment.pop("PYTHONWARNINGS", None)
    arguments = [*map(str, adapters_of_two_bases), "--output", str(output)]
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "combine", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    llama_dir, gpt2_dir = adapters_of_two_bases
    assert lines[0].startswith(
        f"lorakit: warning: {llama_dir} adapts layers of model.layers and {gpt2_dir} layers of "
        "transformer.h, and they share no module"
    )
    assert "UserWarning" not in done.stderr and "combine.py" not in done.stderr
    assert (output / "adapter_model.safetensors").is_file()


def test_combine_warning_format_is_put_back_and_warnings_still_reach_a_recorder():
    original = warnings.formatwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with combine_command.warnings_as_lines():
            text = warnings.formatwarning(UserWarning("two bases"), UserWarning, "f.py", 3)
            warnings.warn("recorded", UserWarning, stacklevel=1)
    assert text == "lorakit: warning: two bases\n"
    assert [str(w.message) for w in caught] == ["recorded"]
    assert warnings.formatwarning is original
