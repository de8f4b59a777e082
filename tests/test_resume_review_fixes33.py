"""Resume review fixes (session 33): another run's checkpoint is not resumed over a run (one
directory, one run); ``train_settings.json`` records local paths absolute, so its resume hint
works from any working directory; another global batch is not also named as a short batch
``None``; under DDP a resumed rank 1 reports the uninterrupted run's (empty) evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import UserError
from lorakit.train import TrainingConfig, pad_collate, train
from lorakit.train.batches import BatchOrder
from lorakit.train.resume import check_resumable
from lorakit.train.run import recorded_settings
from tests.cli_runs import run_cli
from tests.train_job import build_model, make_data

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = Path("adapter") / "adapter_model.safetensors"


# ------------------------------------------------- 1. resume=<another run's checkpoint>
def _config(output: Path, steps: int, seed: int = 3, overwrite: bool = False) -> TrainingConfig:
    return TrainingConfig(
        output_dir=str(output),
        max_steps=steps,
        batch_size=4,
        lr=5e-3,
        warmup_steps=2,
        checkpoint_every=2,
        keep_checkpoints=2,
        progress=False,
        plot=False,
        seed=seed,
        overwrite=overwrite,
    )


def _train(output: Path, steps: int, seed: int = 3, resume=False, overwrite: bool = False):
    config = _config(output, steps, seed, overwrite)
    return train(build_model(0.0), make_data(), pad_collate(0), config, resume=resume)


def _steps(output: Path) -> list[int]:
    records = map(json.loads, (output / "metrics.jsonl").open())
    return [record["step"] for record in records if "loss" in record]


def _files(output: Path) -> dict[str, bytes]:
    """Every file under ``output`` (relative path -> bytes)."""
    return {
        str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """Run A: seed 3, 4 steps, checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("runs") / "A"
    _train(output, 4)
    return output


def _run_b(tmp_path: Path) -> Path:
    """Run B, finished: seed 9, 6 steps, checkpoints at 4 and 6."""
    output = tmp_path / "B"
    _train(output, 6, seed=9)
    return output


def test_another_runs_checkpoint_is_refused_over_a_run_and_leaves_it_whole(run_a, tmp_path):
    """It used to replace B's adapter, keep B's metrics of steps 1-2 before A's 3-4 and leave
    B's step-6 checkpoint beside the new step-4."""
    run_b = _run_b(tmp_path)
    before = _files(run_b)
    foreign = run_a / "checkpoints" / "step-00000002"
    with pytest.raises(UserError) as refused:
        _train(run_b, 4, resume=str(foreign))
    message = str(refused.value)
    assert f"resume={str(foreign)!r} is a checkpoint of another run" in message
    assert f"output directory {run_b} (adapter/, checkpoints/, metrics.jsonl)" in message
    assert f"its own run's directory {run_a}" in message
    assert "a new or empty output directory" in message
    assert "TrainingConfig(overwrite=True)" in message
    assert _files(run_b) == before  # nothing written, nothing deleted
    assert "resume=True resumes it from its newest checkpoint" in message


def test_rerunning_an_interrupted_foreign_start_is_pointed_at_resume_true(tmp_path):
    """B started from A's step-2 checkpoint and was interrupted after its step-4 one: the same
    call again is refused (B now holds a run), and the message names resume=True first, which
    continues B (regression review 33: it offered only ways that repeat steps or delete B)."""
    run_a, run_b = tmp_path / "A", tmp_path / "B"
    keep_all = dataclasses.replace(_config(run_a, 6), keep_checkpoints=10)
    train(build_model(0.0), make_data(), pad_collate(0), keep_all)  # (its step 2 kept)
    foreign = str(run_a / "checkpoints" / "step-00000002")
    _train(run_b, 6, resume=foreign)
    shutil.rmtree(run_b / "adapter")
    shutil.rmtree(run_b / "checkpoints" / "step-00000006")
    with pytest.raises(UserError, match="resume=True resumes it from its newest checkpoint"):
        _train(run_b, 6, resume=foreign)
    result = _train(run_b, 6, resume=True)
    assert result.resumed_from == 4 and result.steps == 6


def test_another_runs_checkpoint_with_overwrite_replaces_the_run_whole(run_a, tmp_path):
    """With overwrite B's files go first: B then holds A's continuation alone (its adapter,
    the metrics of steps 3-4, the step-4 checkpoint of seed 3), as a new directory would."""
    run_b = _run_b(tmp_path)
    result = _train(run_b, 4, resume=run_a / "checkpoints" / "step-00000002", overwrite=True)
    assert result.resumed_from == 2 and result.steps == 4
    assert _steps(run_b) == [3, 4]
    assert sorted(p.name for p in (run_b / "checkpoints").iterdir()) == ["step-00000004"]
    state = json.loads((run_b / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["training_config"]["seed"] == 3
    resumed, original = load_file(run_b / ADAPTER), load_file(run_a / ADAPTER)
    assert resumed.keys() == original.keys()
    assert all(torch.equal(resumed[key], original[key]) for key in original)
    fresh = tmp_path / "fresh"  # a new directory: the same run
    _train(fresh, 4, resume=str(run_a / "checkpoints" / "step-00000002"))
    assert _steps(fresh) == [3, 4]
    assert load_file(fresh / ADAPTER).keys() == original.keys()
    assert all(torch.equal(load_file(fresh / ADAPTER)[k], v) for k, v in original.items())


def test_a_path_to_the_runs_own_checkpoint_continues_it(tmp_path):
    """Own checkpoints are compared as resolved paths (``..``, a symlinked directory); with
    overwrite, which would delete the checkpoint resumed, a path of its own is refused."""
    run_b = _run_b(tmp_path)
    link = tmp_path / "link-to-B"
    link.symlink_to(run_b, target_is_directory=True)
    own = link / "checkpoints" / ".." / "checkpoints" / "step-00000004"
    with pytest.raises(UserError, match="--resume continues the previous run and --overwrite"):
        _train(run_b, 6, seed=9, resume=str(own), overwrite=True)
    result = _train(run_b, 6, seed=9, resume=str(own))
    assert result.resumed_from == 4 and _steps(run_b) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------- 2. train_settings.json: absolute paths
def test_the_recorded_settings_name_local_paths_absolute_and_built_ins_by_name(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = {
        "model": "base",
        "data": "~/train.jsonl",
        "eval_data": "sub/../held.csv",
        "output": "run",
        "resume": True,
        "overwrite": False,
        "lr": 1e-3,
    }
    recorded = recorded_settings(settings)
    here = os.getcwd()
    assert recorded == {
        "model": os.path.join(here, "base"),
        "data": str(tmp_path / "home" / "train.jsonl"),
        "eval_data": os.path.join(here, "held.csv"),
        "output": os.path.join(here, "run"),
        "lr": 1e-3,
    }
    # --output=~/run (no shell expansion after "="): the run writes into ./~/run, and the
    # record must name that directory, not the home one (regression review 33)
    assert recorded_settings({"output": "~/run"})["output"] == os.path.join(here, "~", "run")
    built_ins = {"model": "smollm2-135m-instruct", "data": "rotten-tomatoes", "eval_data": None}
    assert recorded_settings({**built_ins, "output": "/abs/run"}) == {
        **built_ins,
        "output": "/abs/run",
    }


def _interrupt(output: Path) -> None:
    """Leave ``output`` as a run killed after its step-2 checkpoint."""
    shutil.rmtree(output / "adapter")
    shutil.rmtree(output / "checkpoints" / "step-00000004")


def test_the_resume_hint_works_from_another_directory(
    tmp_path, monkeypatch, capsys, model_dir, jsonl
):
    """Started with relative --model, --data and --output; the record (and the refusal's hint)
    repeats the run from any directory. An older record with the paths as typed still resumes
    from the directory they were typed in."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(jsonl, work / "data.jsonl")
    monkeypatch.chdir(work)
    model = os.path.relpath(model_dir, os.getcwd())
    argv = ["train", "--model", model, "--data", "data.jsonl", "--output", "o", "--no-progress"]
    argv += ["--steps", "4", "--batch-size", "4", "--r", "2", "--checkpoint-every", "2"]
    assert run_cli(capsys, *argv)[0] == 0
    record = work / "o" / "train_settings.json"
    recorded = json.loads(record.read_text())
    assert Path(recorded["model"]).resolve() == Path(model_dir).resolve()
    assert Path(recorded["data"]) == Path(os.getcwd(), "data.jsonl")
    assert Path(recorded["output"]) == Path(os.getcwd(), "o")
    _interrupt(work / "o")
    code, _, err = run_cli(capsys, *argv, "--resume", "--lr", "1e-3")
    hint = f"--config {Path(os.getcwd(), 'o', 'train_settings.json')} --resume repeats them"
    assert code == 2 and hint in err
    older = {**recorded, "model": model, "data": "data.jsonl", "output": "o"}
    (work / "older.json").write_text(json.dumps(older))
    code, out, _ = run_cli(capsys, "train", "--config", "older.json", "--resume")
    assert code == 0 and json.loads(out.splitlines()[0])["steps"] == 4
    _interrupt(work / "o")
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "train", "--config", record, "--resume")
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["steps"] == 4
    assert "resuming after step 2: 2 remain" in err
    assert (work / "o" / ADAPTER).is_file() and not (elsewhere / "o").exists()


# ------------------------------------------------- 3. another global batch: no short batch None
def _state(order: BatchOrder) -> dict:
    return {"step": 2, "data_plan": {**order.identity(), "total_steps": 4}}


def _refusal(tmp_path: Path, saved: dict, plan: dict) -> str:
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=4, progress=False, plot=False)
    with pytest.raises(UserError) as refused:
        check_resumable(tmp_path, saved, plan, config, {})
    return str(refused.value)


@pytest.mark.parametrize(
    ("now", "named"),
    [
        (BatchOrder(30, batch_size=3, seed=3), "of 3 (the checkpoint's: 4)"),  # 30 mod 3 = 0
        (BatchOrder(31, batch_size=4, seed=3), "31 training examples (the checkpoint's: 30;"),
    ],
)
def test_another_global_batch_or_count_is_not_also_a_short_batch(tmp_path, now, named):
    """30 examples in batches of 4 keep a short batch of 2; batches of 3 have none (it said
    "short batch None (the checkpoint's: 'kept (2 of 30 examples)')")."""
    saved = _state(BatchOrder(30, batch_size=4, seed=3))
    message = _refusal(tmp_path, saved, {**now.identity(), "total_steps": 4})
    assert named in message
    assert "short batch" not in message and "None" not in message


def test_a_plan_value_this_run_lacks_is_none_in_words(tmp_path):
    saved = _state(BatchOrder(30, batch_size=4, seed=3))
    plan = {key: value for key, value in saved["data_plan"].items() if key != "short_batch"}
    message = _refusal(tmp_path, saved, plan)
    assert "short batch none (the checkpoint's: 'kept (2 of 30 examples)')" in message
    assert "None" not in message


# ------------------------------------------------- 4. DDP: rank 1's evaluation after a resume
_DDP_JOB = """
import json, os, sys
from pathlib import Path
sys.path[:0] = [{src!r}, {root!r}]
import torch
from lorakit.train import TrainingConfig, pad_collate, train
from lorakit.train.distributed import end_distributed_process
from tests.train_job import build_model, make_data

torch.set_num_threads(1)
output = sys.argv[1]
config = TrainingConfig(
    output_dir=output, max_steps=6, batch_size=1, grad_accum=2, lr=5e-3, warmup_steps=1,
    checkpoint_every=3, eval_every=3, progress=False, plot=False, seed=3, strategy="ddp",
)
result = train(build_model(0.0), make_data(), pad_collate(0), config,
               eval_data=make_data(7, seed=6), resume="--resume" in sys.argv)
Path(output, "eval-" + os.environ["RANK"] + ".json").write_text(json.dumps(result.eval_metrics))
end_distributed_process(0)
"""


def _torchrun(job: Path, *arguments: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(job), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=environment
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]


def _evaluations(output: Path) -> list[dict[str, float]]:
    return [json.loads((output / f"eval-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_a_resumed_ddp_run_reports_the_uninterrupted_runs_evaluation_on_every_rank(tmp_path):
    """2 gloo processes, 6 steps, evaluation and checkpoint every 3. Only rank 0 evaluates, so
    rank 1's result holds no evaluation; resumed from step 3, rank 1 used to report step 3's
    (read back from metrics.jsonl) and rank 0 step 6's."""
    job = tmp_path / "job.py"
    job.write_text(_DDP_JOB.format(src=str(ROOT / "src"), root=str(ROOT)))
    output = tmp_path / "run"
    _torchrun(job, str(output))
    uninterrupted = _evaluations(output)
    assert set(uninterrupted[0]) == {"loss", "accuracy"} and uninterrupted[1] == {}
    _interrupt_at_3 = [output / "adapter", output / "checkpoints" / "step-00000006"]
    for path in _interrupt_at_3:
        shutil.rmtree(path)
    for rank in (0, 1):
        (output / f"eval-{rank}.json").unlink()
    _torchrun(job, str(output), "--resume")
    resumed = _evaluations(output)
    assert resumed[1] == {}
    assert resumed[0].keys() == uninterrupted[0].keys()
    for key, value in uninterrupted[0].items():
        assert resumed[0][key] == pytest.approx(value, abs=1e-6)
    records = [json.loads(line) for line in (output / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
