"""DDP under torchrun (gloo, CPU): 2 processes x batch 2 == 1 process x batch 4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lorakit.state import lora_layers
from lorakit.train.distributed import Distributed
from tests.train_job import build_model
from tests.train_job import run as run_job

JOB = Path(__file__).with_name("train_job.py")
ROOT = Path(__file__).resolve().parents[1]


def test_ddp_syncs_only_the_adapter_parameters():
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        model = build_model(0.0)
        wrapped = Distributed(rank=0, world_size=2).wrap(model)  # world_size>1: DDP wrapper
        synced = wrapped._build_params_for_reducer()[0]
        adapter = [
            p for _, layer in lora_layers(model) for p in layer.adapter_parameters("default")
        ]
        assert {id(p) for p in synced} == {id(p) for p in adapter}
        assert len(synced) == 12 < len(list(model.parameters()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Tolerance 1e-5: both runs see the same 4 examples per step and normalise by the step's
    total target count; only float32 summation order differs (per-process padding and the
    all-reduce), which Adam's 1/sqrt(v) can magnify for near-zero gradient entries (measured
    max difference ~5e-8 after 3 steps at lr 5e-3)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(JOB),
        str(tmp_path / "ddp"),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--dropout",
        "0",
        "--checkpoint-every",
        "0",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    single = run_job(
        [
            str(tmp_path / "single"),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--dropout",
            "0",
            "--checkpoint-every",
            "0",
        ]
    )
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys() and len(one) == 12
    for key, tensor in one.items():
        torch.testing.assert_close(ddp[key], tensor, atol=1e-5, rtol=0)
    assert any(t.abs().max() > 1e-3 for t in one.values())  # the runs really trained
    ddp_losses = [json.loads(line)["loss"] for line in (tmp_path / "ddp" / "metrics.jsonl").open()]
    one_losses = [
        json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").open()
    ]
    assert len(ddp_losses) == 3
    torch.testing.assert_close(
        torch.tensor(ddp_losses), torch.tensor(one_losses), atol=1e-5, rtol=0
    )
    # the one-process file holds that run's final in-memory weights
    weights = {k: v for k, v in single.named_parameters() if v.requires_grad}
    assert len(weights) == 12
    for name, tensor in weights.items():
        layer, kind = name.split(".lora_")
        assert torch.equal(
            one[f"base_model.model.{layer}.lora_{kind.replace('.default', '')}"], tensor
        )


TWO_LAYERS_Q_V = 2 * 2  # LoRA layers on q_proj and v_proj of the tiny Llama's 2 blocks


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "adapter_flags", "extra_keys"),
    [
        ("ddp", [], 0),
        ("fsdp", [], 0),
        ("fsdp", ["--use-dora", "--trainable-token-indices", "3,5"], TWO_LAYERS_Q_V + 1),
        ("fsdp", ["--lora-bias"], TWO_LAYERS_Q_V),
    ],
    ids=["ddp", "fsdp", "fsdp-dora-tokens", "fsdp-lora-bias"],
)
def test_torchrun_lorakit_train_matches_one_process(
    tmp_path, model_dir, jsonl, strategy, adapter_flags, extra_keys
):
    """``torchrun --nproc_per_node 2 -m lorakit train`` (batch 2 per process; DDP, or FSDP with
    the base sharded) ends with the adapter and losses of ``lorakit train`` in one process with
    batch 4; under FSDP also with DoRA magnitudes, trainable token rows or biases on B."""
    from lorakit import cli

    flags = [
        "--model",
        str(model_dir),
        "--data",
        str(jsonl),
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--dropout",
        "0",
        "--target-modules",
        "q_proj,v_proj",
        "--no-progress",
        *adapter_flags,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lorakit",
        "train",
        *flags,
        "--batch-size",
        "2",
        "--output",
        str(tmp_path / "ddp"),
        "--strategy",
        strategy,
    ]
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env=environment
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    printed = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["steps"] == 3  # rank 0 reports
    adapter_config = json.loads((tmp_path / "ddp" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4  # --rank: the spelling of --r that torchrun leaves alone
    assert cli.main(["train", *flags, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys() and len(one) == 2 * TWO_LAYERS_Q_V + extra_keys  # A, B
    for key, tensor in one.items():
        torch.testing.assert_close(ddp[key], tensor, atol=1e-5, rtol=0)
    assert all(t.abs().max() > 1e-3 for k, t in one.items() if "lora_B" in k)  # trained
    losses = {
        run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("ddp", "one")
    }
    assert len(losses["one"]) == 3
    torch.testing.assert_close(
        torch.tensor(losses["ddp"]), torch.tensor(losses["one"]), atol=1e-5, rtol=0
    )


def _run_copy(source: Path, target: Path) -> Path:
    """A copy of run directory ``source`` without its final adapter: a run to resume from its
    last checkpoint."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "adapter")
    return target


@pytest.mark.slow
def test_a_checkpoint_resumes_with_its_own_batches_under_another_process_count(tmp_path):
    """48 examples in global batches of 10: one process keeps the short batch of 8 (5 steps an
    epoch), torchrun drops it (4). A one-process checkpoint resumed by 2 DDP processes (and the
    reverse) keeps the checkpoint's epochs, so step 5 takes the same examples and the adapter is
    the uninterrupted run's (tolerance 1e-5, as above)."""
    flags = ["--steps", "6", "--checkpoint-every", "4", "--dropout", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", str(JOB)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def two_processes(output: Path, *extra: str) -> None:
        command = [*torchrun, str(output), *flags, "--batch-size", "5", *extra]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=240, env=environment
        )
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]

    run_job([str(tmp_path / "one"), *flags, "--batch-size", "10"])
    two_processes(tmp_path / "two")
    two_processes(_run_copy(tmp_path / "one", tmp_path / "one-then-two"), "--resume")
    resumed = _run_copy(tmp_path / "two", tmp_path / "two-then-one")
    run_job([str(resumed), *flags, "--batch-size", "10", "--resume"])
    for uninterrupted, resumed in (("one", "one-then-two"), ("two", "two-then-one")):
        expected = load_file(tmp_path / uninterrupted / "adapter" / "adapter_model.safetensors")
        tensors = load_file(tmp_path / resumed / "adapter" / "adapter_model.safetensors")
        for key, tensor in expected.items():
            torch.testing.assert_close(tensors[key], tensor, atol=1e-5, rtol=0)
