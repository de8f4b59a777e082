"""Checkpoints: contents, atomic layout, pruning, and exact resume after SIGKILL (dropout on)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import UserError
from lorakit.train import TrainingConfig, latest_checkpoint, pad_collate, train
from lorakit.train.batches import BatchOrder
from lorakit.train.checkpoint import load_checkpoint
from lorakit.train.optim import build_optimizer
from lorakit.train.resume import check_resumable, resumed_drop_last
from lorakit.train.schedule import build_scheduler
from tests.train_job import build_model, make_data
from tests.train_job import run as run_job

JOB = Path(__file__).with_name("train_job.py")


def _trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_checkpoint_holds_adapter_optimizer_scheduler_rng_and_position(tmp_path):
    model = run_job([str(tmp_path), "--steps", "6", "--checkpoint-every", "2"])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000006"]  # keep_checkpoints=2, no temp dirs left
    newest = latest_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoints" / "step-00000006"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["examples_seen"] == 24
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 6  # 48 examples / 4 per step
    assert state["scheduler"]["last_epoch"] == 6
    # the PEFT adapter and the resume tensors hold the final weights
    adapter = load_file(newest / "adapter" / "adapter_model.safetensors")
    final = _trainable(model)
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(adapter[q_a], final["model.layers.0.self_attn.q_proj.lora_A.default.weight"])
    assert load_file(newest / "trainable.safetensors").keys() == final.keys()
    moments = load_file(newest / "optimizer.safetensors")
    assert len([k for k in moments if k.endswith(".exp_avg")]) == len(final)


def test_load_checkpoint_restores_optimizer_state_exactly(tmp_path):
    trained = run_job([str(tmp_path), "--steps", "3", "--checkpoint-every", "3"])
    fresh = build_model(0.1)
    optimizer = build_optimizer(fresh, lr=5e-3)
    scheduler = build_scheduler(optimizer, total_steps=3, warmup_steps=2)
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path), fresh, optimizer, scheduler)
    assert checkpoint.step == 3 and scheduler.last_epoch == 3
    for name, tensor in _trainable(trained).items():
        assert torch.equal(dict(fresh.named_parameters())[name], tensor)
    first = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert float(first["step"]) == 3.0 and first["exp_avg"].abs().sum() > 0


def test_resume_refuses_a_model_with_other_adapter_shapes(tmp_path):
    run_job([str(tmp_path), "--steps", "2", "--checkpoint-every", "2"])
    import lorakit
    from tests import tiny_models

    other = lorakit.inject(
        tiny_models.llama(),
        lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    config = TrainingConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, progress=False)
    with pytest.raises(UserError, match=r"adapter settings: .*--r 2 \(the checkpoint's: 4\)"):
        train(other, make_data(), pad_collate(0), config, resume=True)
    # loaded directly (no settings to compare): the tensors' shapes refuse it
    optimizer = build_optimizer(other, lr=5e-3)
    scheduler = build_scheduler(optimizer, total_steps=4, warmup_steps=2)
    with pytest.raises(UserError, match="has shape"):
        load_checkpoint(latest_checkpoint(tmp_path), other, optimizer, scheduler)


def _start_job(output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(JOB), str(output_dir), "--steps", "12", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """Kill the job (dropout 0.1) with SIGKILL right after its step-4 checkpoint, resume it, and
    compare with a run that was never interrupted: bit-identical final adapter."""
    killed_dir = tmp_path / "killed"
    job = _start_job(killed_dir, "--slow", "0.25")
    checkpoint = killed_dir / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    assert checkpoint.exists() and not (killed_dir / "adapter").exists()  # really interrupted
    resumed = subprocess.run(
        [sys.executable, str(JOB), str(killed_dir), "--steps", "12", "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # the uninterrupted run in a process of its own too: all three runs start from the same
    # state, whatever earlier tests left in this one
    straight = subprocess.run(
        [sys.executable, str(JOB), str(tmp_path / "straight"), "--steps", "12"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    resumed_adapter = load_file(killed_dir / "adapter" / "adapter_model.safetensors")
    straight_adapter = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert resumed_adapter.keys() == straight_adapter.keys()
    for key, tensor in straight_adapter.items():
        assert torch.equal(resumed_adapter[key], tensor), key
    steps = [
        r["step"] for r in map(json.loads, (killed_dir / "metrics.jsonl").open()) if "loss" in r
    ]
    assert steps == list(range(1, 13))  # no duplicated or missing records after resume
    # training moved every factor (B from 0)
    initial = _trainable(build_model(0.1))
    assert len(initial) == len(straight_adapter) == 12
    for name, tensor in initial.items():
        layer, kind = name.split(".lora_")
        key = f"base_model.model.{layer}.lora_{kind.replace('.default', '')}"
        assert (straight_adapter[key] - tensor).abs().max() > 1e-3, name


def _loss_steps(output_dir: Path) -> list[int]:
    records = map(json.loads, (output_dir / "metrics.jsonl").open())
    return [r["step"] for r in records if "loss" in r]


def _job_config(output_dir: Path, **overrides) -> TrainingConfig:
    settings = dict(
        output_dir=str(output_dir), max_steps=3, batch_size=4, progress=False, plot=False, seed=3
    )
    return TrainingConfig(**{**settings, **overrides})


def test_a_new_run_refuses_a_directory_holding_a_previous_run(tmp_path):
    train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path, checkpoint_every=3))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as error:
        train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path, max_steps=2))
    message = str(error.value)
    assert "\n" not in message and "adapter/, checkpoints/, metrics.jsonl" in message
    assert "--resume" in message and "--overwrite" in message
    assert _loss_steps(tmp_path) == [1, 2, 3]  # untouched
    # --overwrite starts clean: the old run's checkpoints are gone, other files stay
    config = _job_config(tmp_path, max_steps=2, overwrite=True)
    train(build_model(0.0), make_data(), pad_collate(0), config)
    assert _loss_steps(tmp_path) == [1, 2]
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint_is_refused_and_the_run_kept(tmp_path):
    """A run killed before its first checkpoint (or one that wrote none) left metrics: --resume
    has nothing to continue, so it is refused (as transformers.Trainer refuses it) instead of
    starting over with settings nothing compares; --overwrite starts over."""
    train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path))
    assert latest_checkpoint(tmp_path) is None
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError) as error:
        config = _job_config(tmp_path, lr=0.5)
        train(build_model(0.0), make_data(), pad_collate(0), config, resume=True)
    message = str(error.value)
    assert f"no checkpoint to resume in {tmp_path}" in message and "\n" not in message
    assert "(adapter/, metrics.jsonl)" in message and "--overwrite" in message
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert _loss_steps(tmp_path) == [1, 2, 3]
    config = _job_config(tmp_path, overwrite=True)
    train(build_model(0.0), make_data(), pad_collate(0), config)
    assert _loss_steps(tmp_path) == [1, 2, 3]


def test_a_killed_writers_temporary_checkpoint_is_removed(tmp_path):
    config = _job_config(tmp_path, max_steps=6, checkpoint_every=3)
    train(build_model(0.0), make_data(), pad_collate(0), config)
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step-00000006")  # killed after step 3's checkpoint
    stale = root / ".tmp-step-00000004-4194999"  # above Linux's largest pid: no such process
    live = root / f".tmp-step-00000004-{os.getppid()}"  # a live process: left alone
    for directory in (stale, live):
        directory.mkdir(parents=True)
        (directory / "trainable.safetensors").write_bytes(b"half")
        os.utime(directory, (time.time() - 600, time.time() - 600))
    train(build_model(0.0), make_data(), pad_collate(0), config, resume=True)
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step-00000003", "step-00000006"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    from lorakit.train import checkpoint as checkpoint_module

    real_save_file = checkpoint_module.save_file

    def save_file(tensors, path):
        if "step-00000004" in path and path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    config = _job_config(tmp_path, max_steps=6, checkpoint_every=2)
    with pytest.raises(UserError) as error:
        train(build_model(0.0), make_data(), pad_collate(0), config)
    message = str(error.value)
    previous = tmp_path / "checkpoints" / "step-00000002"
    assert "\n" not in message and "No space left on device" in message
    assert "step 4" in message and f"previous checkpoint {previous} is kept" in message
    assert sorted(p.name for p in previous.parent.iterdir()) == ["step-00000002"]  # no temp dir
    assert latest_checkpoint(tmp_path) == previous
    assert json.loads((previous / "trainer_state.json").read_text())["step"] == 2


def test_checkpoint_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path, checkpoint_every=3))
    final = tmp_path / "checkpoints" / "step-00000003"
    (rename,) = [
        i
        for i, (kind, path) in enumerate(events)
        if kind == "replace" and Path(path).name.startswith(".tmp-step-")
    ]
    temporary = events[rename][1]
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    written = [p.relative_to(final) for p in final.rglob("*")]
    assert len(written) >= 7  # 4 files, adapter/ and its 2 files
    for relative in written:
        assert f"{temporary}/{relative}" in synced_before, relative
    assert temporary in synced_before
    synced_after = {path for kind, path in events[rename:] if kind == "fsync"}
    assert str(final.parent) in synced_after


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"lr": 1e-3}, r"--lr 0\.001 \(the checkpoint's: 0\.0002\)"),
        ({"weight_decay": 0.1}, r"--weight-decay 0\.1 \(the checkpoint's: 0\.0\)"),
        ({"loraplus_ratio": 16.0}, r"--loraplus-ratio 16\.0 \(the checkpoint's: none\)"),
        ({"warmup_ratio": 0.5, "max_grad_norm": 0.5}, r"--warmup-ratio .*; --max-grad-norm"),
    ],
)
def test_resume_refuses_other_optimizer_settings_naming_each(tmp_path, changes, named):
    """A resumed run with another lr (or schedule, decay, LoRA+ ratio, clipping) would be a
    hybrid of two runs: it is refused before anything is loaded, naming the flags."""
    train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path, checkpoint_every=2))
    model = build_model(0.0)
    before = _trainable(model)
    config = _job_config(tmp_path, max_steps=3, **changes)
    with pytest.raises(UserError, match=f"adapter settings: {named}"):
        train(model, make_data(), pad_collate(0), config, resume=True)
    assert all(torch.equal(before[k], v) for k, v in _trainable(model).items())


def _saved_plan(order: BatchOrder) -> dict:
    """A checkpoint's ``trainer_state.json`` holding only ``order``'s data plan."""
    return {"step": 4, "data_plan": {**order.identity(), "total_steps": 20}}


def test_a_checkpoint_keeps_its_short_batch_under_another_process_count(tmp_path):
    """With 50 examples and a global batch of 4 one process keeps the short batch (13 steps an
    epoch) and torchrun drops it (12): a resume under the other process count follows the
    checkpoint's plan where it can, and is refused, naming the short batch and what to do, where
    its processes cannot split the short batch (1 example over 2 processes)."""
    one = BatchOrder(50, batch_size=4, seed=3)
    two = BatchOrder(50, batch_size=2, world_size=2, seed=3, drop_last=True)
    for saved, resuming in ((one, two), (two, one)):
        drop_last = resumed_drop_last(_saved_plan(saved), resuming)
        follows = dataclasses.replace(resuming, drop_last=drop_last)
        assert follows.identity() == saved.identity()
        assert follows.steps_per_epoch == saved.steps_per_epoch
        assert [follows.step_indices(s) for s in range(30)] == [
            saved.step_indices(s) for s in range(30)
        ]
    one, two = dataclasses.replace(one, num_examples=49), dataclasses.replace(two, num_examples=49)
    assert resumed_drop_last(_saved_plan(one), two) is True  # 1 example cannot be split
    plan = {**two.identity(), "total_steps": 20}
    with pytest.raises(
        UserError,
        match=r"short batch 'dropped \(1 of 49 examples\)' \(the "
        r"checkpoint's: 'kept \(1 of 49 examples\)'\).*resume in one process",
    ):
        check_resumable(tmp_path, _saved_plan(one), plan, _job_config(tmp_path), {})


def test_resume_refuses_another_alpha_or_dropout(tmp_path):
    train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path, checkpoint_every=2))
    with pytest.raises(UserError, match=r"--dropout 0\.2 \(the checkpoint's: 0\.0\)"):
        train(build_model(0.2), make_data(), pad_collate(0), _job_config(tmp_path), resume=True)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("trainer_state.json", "JSONDecodeError"),
        ("trainable.safetensors", "SafetensorError"),
        ("rng.safetensors", "SafetensorError"),
        ("optimizer.safetensors missing", "optimizer.safetensors is missing"),
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_way_back(tmp_path, damage, named):
    train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path, checkpoint_every=2))
    newest = latest_checkpoint(tmp_path)
    path = newest / damage.split()[0]
    if damage.endswith("missing"):
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:20])  # truncated
    with pytest.raises(UserError) as error:
        train(build_model(0.0), make_data(), pad_collate(0), _job_config(tmp_path), resume=True)
    message = str(error.value)
    assert f"checkpoint {newest} is damaged" in message and named in message
    assert "Remove it" in message and "--resume again" in message


def test_a_full_disk_inside_safetensors_is_one_line_too(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError, not an OSError."""
    from safetensors import SafetensorError

    from lorakit.train import checkpoint as checkpoint_module

    def save_file(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    config = _job_config(tmp_path, max_steps=2, checkpoint_every=2)
    with pytest.raises(UserError, match=r"cannot write the checkpoint of step 2 .*File too large"):
        train(build_model(0.0), make_data(), pad_collate(0), config)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no temporary directory left


def test_resuming_a_finished_run_reports_its_last_loss_and_evaluation(tmp_path):
    def run(resume):
        config = _job_config(tmp_path, checkpoint_every=3, eval_every=3)
        data = make_data()
        return train(
            build_model(0.0), data, pad_collate(0), config, eval_data=data[:8], resume=resume
        )

    first = run(False)
    again = run(True)
    assert first.final_loss is not None and again.final_loss == first.final_loss
    assert again.eval_metrics == first.eval_metrics != {}


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_a_full_disk_at_the_final_adapter_says_where_the_weights_are(
    tmp_path, monkeypatch, checkpoint_every
):
    import errno

    from lorakit.io import atomic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    config = _job_config(tmp_path, max_steps=2, checkpoint_every=checkpoint_every)
    real = atomic.write_files
    if checkpoint_every:  # the checkpoint's adapter is written; then the disk is full
        calls = []

        def full_after_one(files):
            calls.append(files)
            if len(calls) > 1:
                full()
            real(files)

        monkeypatch.setattr(atomic, "write_files", full_after_one)
    else:
        monkeypatch.setattr(atomic, "write_files", full)
    with pytest.raises(UserError) as error:
        train(build_model(0.0), make_data(), pad_collate(0), config)
    message = str(error.value)
    assert "cannot write the trained adapter" in message and "No space left" in message
    if checkpoint_every:
        assert f"{latest_checkpoint(tmp_path)}, holds its step's weights" in message
        assert "--resume" in message
    else:
        assert "weights are lost" in message
    assert not (tmp_path / "adapter").exists()  # no empty directory left behind
