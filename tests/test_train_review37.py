"""Session 37's training review: checks that need only the settings and the data come before
``--overwrite`` deletes a run (``--alpha 0``; a global batch larger than the data under
torchrun), ``--epochs`` is checked with ``--steps`` too, a resume with other micro-batches of the
same global batch warns where dropout makes it inexact, and the start-up line counts the
examples a step really holds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit.train.loop
from lorakit.errors import UserError
from lorakit.train import TrainingConfig, pad_collate, train
from tests.cli_runs import run_cli
from tests.train_job import build_model, make_data

SOURCE = Path(lorakit.train.loop.__file__).resolve().parents[2]  # the lorakit under test


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes (the oracle: the run as
    it was before the refused command)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _train_argv(model_dir, jsonl, output, *more) -> list:
    argv = ["train", "--model", model_dir, "--data", jsonl, "--output", output, "--no-progress"]
    return [*argv, "--target-modules", "q_proj", "--rank", "2", "--steps", "2", *more]


@pytest.fixture
def finished_run(tmp_path, capsys, model_dir, jsonl) -> Path:
    """A finished one-process run (adapter, 2 checkpoints, metrics, curve, settings)."""
    output = tmp_path / "run"
    argv = _train_argv(model_dir, jsonl, output, "--batch-size", "4", "--checkpoint-every", "1")
    assert run_cli(capsys, *argv)[0] == 0
    assert {"adapter", "checkpoints", "metrics.jsonl", "train_settings.json"} <= {
        path.name for path in output.iterdir()
    }
    return output


def _refuse_to_load(monkeypatch):
    import lorakit.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(lorakit.models, "load_model", load_model)


# ------------------------------------------------------------ 1. checks before --overwrite deletes
def test_alpha_0_with_overwrite_is_refused_before_loading_and_keeps_the_run_byte_identical(
    finished_run, tmp_path, capsys, monkeypatch, model_dir, jsonl
):
    before = _snapshot(finished_run)
    argv = _train_argv(model_dir, jsonl, finished_run, "--batch-size", "4", "--alpha", "0")
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert _snapshot(finished_run) == before
    assert code == 2 and "lora_alpha 0 (--alpha)" in err and err.count("\n") == 1
    _refuse_to_load(monkeypatch)  # found before the model loads
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 2 and "lora_alpha 0 (--alpha)" in err
    new = tmp_path / "new"  # a new directory: not created, no settings recorded
    code, _, err = run_cli(capsys, *_train_argv(model_dir, jsonl, new, "--alpha", "0"))
    assert code == 2 and "lora_alpha 0" in err and not new.exists()


def test_a_global_batch_larger_than_the_data_is_refused_before_overwrite_deletes(
    finished_run, capsys, monkeypatch, model_dir, jsonl
):
    """As rank 0 of 2 processes (``WORLD_SIZE=2``), 24 examples in global batches of 2 x 16 = 32:
    the short batch is dropped, so no step is left. Joining the process group would wait for
    rank 1, so reaching it is made an error: the refusal must come before it (and before
    anything is deleted or loaded)."""
    before = _snapshot(finished_run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def no_group(*args, **kwargs):
        raise UserError("the process group was joined")

    monkeypatch.setattr(lorakit.train.loop, "setup_distributed", no_group)
    argv = _train_argv(model_dir, jsonl, finished_run, "--batch-size", "16", "--overwrite")
    code, _, err = run_cli(capsys, *argv)
    examples = len(Path(jsonl).read_text().splitlines())  # 24
    assert _snapshot(finished_run) == before
    assert code == 2 and err.count("\n") == 1
    assert f"{examples} training examples are fewer than one global batch (32 = " in err
    assert "batch_size 16 x grad_accum 1 x 2 processes" in err


@pytest.mark.slow
def test_torchrun_with_a_global_batch_larger_than_the_data_keeps_the_previous_run(
    finished_run, model_dir, jsonl
):
    """The review's case under a real ``torchrun`` (2 gloo processes)."""
    before = _snapshot(finished_run)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "lorakit"]
    command += _train_argv(model_dir, jsonl, finished_run, "--batch-size", "16", "--overwrite")
    python_path = os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    completed = subprocess.run(
        [str(a) for a in command], capture_output=True, text=True, timeout=300, env=environment
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output[-2000:]
    assert "24 training examples are fewer than one global batch (32 = " in output
    assert _snapshot(finished_run) == before


# ------------------------------------------------------------ 2. --epochs with --steps
@pytest.mark.parametrize("epochs", [math.nan, -3.0, 0.0, math.inf])
def test_epochs_is_checked_when_steps_is_given_too(epochs):
    with pytest.raises(UserError, match=rf"^epochs must be a finite number > 0, got {epochs}$"):
        TrainingConfig(max_steps=2, epochs=epochs)
    assert TrainingConfig(max_steps=2, epochs=0.5).total_steps(10) == 2


@pytest.mark.parametrize("epochs", ["nan", "-3"])
def test_cli_epochs_nan_with_steps_is_one_line_and_writes_nothing(
    tmp_path, capsys, model_dir, jsonl, epochs
):
    output = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_argv(model_dir, jsonl, output, "--epochs", epochs))
    assert code == 2
    assert err == f"lorakit: error: --epochs must be a finite number > 0, got {float(epochs)}\n"
    assert not output.exists()


# ------------------------------------------------------------ 3. resume with other micro-batches
def _config(output: Path, **changes) -> TrainingConfig:
    settings = {"output_dir": str(output), "max_steps": 4, "batch_size": 4, "lr": 5e-3}
    settings |= {"progress": False, "plot": False, "seed": 3}
    settings |= {"checkpoint_every": 2, "keep_checkpoints": 5}
    return TrainingConfig(**(settings | changes))


def _adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


def _resumed_from_step_2(tmp_path: Path, dropout: float, **split) -> tuple[float, list]:
    """The uninterrupted run (batch 4) and one resumed from its step-2 checkpoint with the
    micro-batches ``split``: the largest adapter difference, and the warnings of the resume."""
    whole = tmp_path / f"whole-{dropout}"
    train(build_model(dropout), make_data(), pad_collate(0), _config(whole))
    resumed = tmp_path / f"resumed-{dropout}-{sorted(split.items())}"
    checkpoint = whole / "checkpoints" / "step-00000002"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = _config(resumed, **split)
        train(build_model(dropout), make_data(), pad_collate(0), config, resume=str(checkpoint))
    a, b = _adapter(whole), _adapter(resumed)
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    return difference, [str(w.message) for w in caught if "bit-identical" in str(w.message)]


def test_other_micro_batches_with_dropout_warn_and_the_run_indeed_differs(tmp_path):
    """Oracle: the uninterrupted run. With dropout 0.1, batch 2 x accumulation 2 draws other
    masks than batch 4: the adapters differ, and the resume says so, naming both splits."""
    difference, said = _resumed_from_step_2(tmp_path, 0.1, batch_size=2, grad_accum=2)
    assert difference > 1e-4
    assert len(said) == 1
    named = "--batch-size 2 --grad-accum 2 where the checkpoint's run used --batch-size 4 "
    assert named in said[0]
    assert "--dropout 0.1" in said[0]


def test_the_same_split_or_no_dropout_resumes_without_a_warning(tmp_path):
    difference, said = _resumed_from_step_2(tmp_path, 0.1)  # the same split: exact
    assert difference == 0.0 and said == []
    difference, said = _resumed_from_step_2(tmp_path, 0.0, batch_size=2, grad_accum=2)
    assert difference < 1e-6 and said == []  # only float rounding differs


# ------------------------------------------------------------ 4. the start-up line
def test_the_start_up_line_counts_the_examples_a_step_holds(tmp_path, capsys, model_dir, jsonl):
    """24 examples, --batch-size 64 in one process: the short batch is kept, so each step holds
    the 24 (the oracle: the data file's line count), not 64."""
    examples = len(Path(jsonl).read_text().splitlines())
    argv = _train_argv(model_dir, jsonl, tmp_path / "run", "--batch-size", "64")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and json.loads(out.splitlines()[0])["steps"] == 2
    assert f"2 optimizer steps of {examples} examples (all of them: the global batch, 64, " in err
    assert "of 64 examples" not in err
