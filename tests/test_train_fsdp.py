"""FSDP2 training (``--strategy fsdp``): the sharded forward takes lorakit's fast path; 2 gloo
processes match one process with the same global batch (losses, eval, checkpoint, adapter) while
each holds half of the base; a SIGKILLed process resumes to the same adapter; refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import lorakit
from lorakit import fast
from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.train import TrainingConfig, pad_collate, train
from lorakit.train.config import SettingError
from lorakit.train.fsdp import (
    ShardedSaver,
    check_shardable,
    fsdp_units,
    local_parameter_bytes,
    shard,
    whole,
)
from lorakit.train.loop import enable_gradient_checkpointing
from tests import tiny_models
from tests.train_job import build_model, make_data
from tests.train_job import run as run_job

JOB = Path(__file__).with_name("train_job.py")
ROOT = Path(__file__).resolve().parents[1]
SAME_BATCH_AS_TWO_OF_2 = ["--batch-size", "4", "--dropout", "0"]


@pytest.fixture
def one_process_group():
    """A gloo group of one process: FSDP shards over a mesh of one, but still swaps DTensor
    pieces for gathered tensors around each block, as with N processes."""
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_units_are_the_transformer_blocks():
    model = build_model(0.0)
    assert fsdp_units(model) == list(model.model.layers)
    gpt2 = tiny_models.gpt2()
    assert fsdp_units(gpt2) == list(gpt2.transformer.h)


def test_sharded_blocks_take_the_fast_path_with_the_same_values(one_process_group, monkeypatch):
    """After FSDP's all-gather the LoRA layers see whole plain tensors: the fused fast path runs
    (forward and, with gradient checkpointing, the recomputation) and loss and adapter gradients
    equal those of the unsharded model."""
    batch = pad_collate(0)(make_data(4))
    reference = build_model(0.0).train()
    reference_loss = reference(**batch).loss
    reference_loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    model = build_model(0.0).train()
    enable_gradient_checkpointing(model)
    shard(model)
    weights_seen = []
    original = fast.fused_lora_linear

    def spy(x, weight, *args, **kwargs):
        weights_seen.append(type(weight))
        return original(x, weight, *args, **kwargs)

    monkeypatch.setattr(fast, "fused_lora_linear", spy)
    loss = model(**batch).loss
    loss.backward()
    assert weights_seen == [torch.nn.Parameter] * 12  # 6 layers, forward + recomputation
    lora_A = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert isinstance(lora_A, DTensor)  # sharded again after the pass
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
    grads = {n: whole(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys() and len(grads) == 12
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0)


def _torchrun_job(output: Path, *flags: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(JOB),
        str(output),
        "--strategy",
        "fsdp",
        "--batch-size",
        "2",
        "--dropout",
        "0",
        *flags,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )


def _finish(job: subprocess.Popen) -> None:
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]


def _records(output: Path, field: str) -> list[float]:
    records = map(json.loads, (output / "metrics.jsonl").open())
    return [record[field] for record in records if field in record]


def _assert_close_files(path: Path, expected_path: Path) -> None:
    tensors, expected = load_file(path), load_file(expected_path)
    assert tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(tensors[key], tensor, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_sharded_processes_match_one_process_and_each_holds_half_the_base(tmp_path):
    """Tolerance 1e-5 as for DDP (only float32 summation order differs; measured ~2e-7). The
    FSDP run also recomputes activations (gradient checkpointing) and evaluates every 2 steps."""
    flags = ["--steps", "4", "--checkpoint-every", "2", "--eval-every", "2"]
    job = _torchrun_job(tmp_path / "fsdp", *flags, "--gradient-checkpointing")
    single = run_job([str(tmp_path / "one"), *flags, *SAME_BATCH_AS_TWO_OF_2])
    _finish(job)
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    for field in ("loss", "eval_loss", "grad_norm"):
        assert len(_records(one, field)) in (2, 4)
        torch.testing.assert_close(
            torch.tensor(_records(fsdp, field)),
            torch.tensor(_records(one, field)),
            atol=1e-5,
            rtol=0,
        )
    for name in ("trainable", "optimizer"):  # a checkpoint's gathered tensors
        step_2 = Path("checkpoints") / "step-00000002" / f"{name}.safetensors"
        _assert_close_files(fsdp / step_2, one / step_2)
    _assert_close_files(
        fsdp / "adapter" / "adapter_model.safetensors",
        one / "adapter" / "adapter_model.safetensors",
    )
    config = json.loads((fsdp / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((one / "adapter" / "adapter_config.json").read_text())
    assert all(p.abs().max() > 1e-3 for n, p in single.named_parameters() if "lora_B" in n)
    # what each process holds: DDP (and one process) the whole model, FSDP about half
    whole_model = local_parameter_bytes(build_model(0.0))
    held = [json.loads((fsdp / f"process-{rank}.json").read_text()) for rank in (0, 1)]
    assert sum(h["frozen"] for h in held) == whole_model["frozen"]
    assert sum(h["trainable"] for h in held) == whole_model["trainable"]
    for process in held:
        assert abs(process["frozen"] - whole_model["frozen"] / 2) < 0.05 * whole_model["frozen"]


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_one_process_adapter(tmp_path):
    """SIGKILL process 1 after the step-4 checkpoint (torchrun then stops process 0), resume with
    --resume: the final adapter equals one process's uninterrupted one within 1e-5. The FSDP run
    accumulates 2 micro-batches of 1 per process (gradients reduce-scattered on the last)."""
    output = tmp_path / "killed"
    flags = ["--steps", "8", "--checkpoint-every", "4"]
    accumulating = ["--batch-size", "1", "--grad-accum", "2"]
    job = _torchrun_job(output, *flags, *accumulating, "--slow", "0.15")
    checkpoint = output / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(json.loads((output / "process-1.json").read_text())["pid"], signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0
    assert checkpoint.exists() and not (output / "adapter").exists()  # really interrupted
    _finish(_torchrun_job(output, *flags, *accumulating, "--resume"))
    run_job([str(tmp_path / "one"), *flags, *SAME_BATCH_AS_TWO_OF_2])
    _assert_close_files(
        output / "adapter" / "adapter_model.safetensors",
        tmp_path / "one" / "adapter" / "adapter_model.safetensors",
    )
    assert [int(step) for step in _records(output, "step")] == list(range(1, 9))  # no repeats


def test_a_quantized_base_is_refused():
    model = build_model(0.0)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        quantized = torch.nn.Parameter(weight.to(torch.int8), requires_grad=False)
    model.model.layers[0].mlp.up_proj.weight = quantized
    with pytest.raises(UserError, match=r"quantized base.*up_proj.weight is torch.int8"):
        check_shardable(model)
    model = build_model(0.0)
    model.config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(UserError, match="quantization_config"):
        check_shardable(model)
    check_shardable(build_model(0.0))  # a float base passes


@pytest.mark.parametrize("quantize", ["int8_rows", "int4_groups"])
def test_lorakits_own_weight_only_bases_are_refused(quantize):
    """int8-rows / int4-groups (and GGUF blocks) keep their codes in buffers, not parameters:
    the check names the quantized module rather than letting FSDP shard a model it cannot."""
    import importlib

    model = build_model(0.0)
    importlib.import_module(f"lorakit.quantized.{quantize}").quantize_linears(model)
    with pytest.raises(UserError, match=r"quantized base yet \(module .*(int8|int4)"):
        check_shardable(model)


def test_layer_replication_is_refused_by_name():
    """Copied blocks share their base weights, which FSDP2 cannot shard in two units: a
    UserError naming layer_replication before sharding, not torch's ValueError."""
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])
    model = lorakit.inject(tiny_models.llama(), config)
    with pytest.raises(
        UserError, match=r"layer_replication yet \(adapter 'default'.*--strategy ddp"
    ):
        check_shardable(model)


def _saved_keys(model) -> set[str]:
    """The keys of the adapter file a one-process run saves of ``model``."""
    from lorakit.io.save import adapter_file_contents

    return set(adapter_file_contents(model)[0])


@pytest.mark.parametrize(
    ("settings", "key_end"),
    [
        ({"use_dora": True}, ".lora_magnitude_vector"),
        ({"lora_bias": True}, ".lora_B.bias"),
        ({"trainable_token_indices": [3, 5]}, ".token_adapter.trainable_tokens_delta"),
    ],
)
def test_the_sharded_saver_knows_the_parameter_of_every_saved_key(settings, key_end):
    """DoRA magnitudes, biases on B and trainable token rows are saved under FSDP too: each key
    of the one-process adapter file maps to the parameter holding it."""
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **settings)
    model = lorakit.inject(tiny_models.llama(), config)
    saver = ShardedSaver(model)
    keys = _saved_keys(model)
    assert saver.parameter_of.keys() == keys and any(key.endswith(key_end) for key in keys)
    parameters = dict(model.named_parameters())
    for key, name in saver.parameter_of.items():
        assert parameters[name].requires_grad, key


def test_fsdp_in_one_process_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = TrainingConfig(output_dir=str(tmp_path / "run"), strategy="fsdp", max_steps=1)
    with pytest.raises(UserError, match=r"--strategy fsdp .* 1 process; start it with torchrun"):
        train(build_model(0.0), make_data(8), pad_collate(0), config)
    missing_model = str(tmp_path / "no-such-model")
    code = main(
        [
            "train",
            "--model",
            missing_model,
            "--data",
            "rotten-tomatoes",
            "--strategy",
            "fsdp",
            "--output",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 2
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err  # not the missing model
    with pytest.raises(SettingError, match="strategy must be one of"):
        TrainingConfig(strategy="zero3")
    assert lorakit.train.TrainingConfig().strategy == "ddp"
