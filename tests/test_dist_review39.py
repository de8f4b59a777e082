"""Review fixes (round 39) of torchrun training (DDP / FSDP2 with gloo on the CPU).

1. FSDP's refusals (a quantized base, ``layer_replication``) came after ``overwrite=True`` had
   deleted the previous run: now before, the directory byte-identical.
2. FSDP sharded each process's own model: processes that built different models (a seed per
   process before ``inject``; PiSSA) trained pieces of several. Now every process starts from
   process 0's model, as under DDP: the one-process losses and adapter.
3. ``lorakit.save_adapter`` and a second ``train`` of the model FSDP left sharded failed with a
   torch error (the second after deleting the run): now one lorakit error, nothing deleted.
4. Too little data for one global batch: the advice names fewer processes, and only the batch
   flags above 1.
5. A refused ``--resume`` announced "(resuming after step S ...)" first: now only its error.

The torchrun job is this file run as a script: ``torchrun --nproc_per_node 2
tests/test_dist_review39.py OUT`` (each process writes ``OUT/results-<rank>.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # the torchrun job: this checkout's lorakit, and tests.
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lorakit  # noqa: E402
from lorakit import cli  # noqa: E402
from lorakit.errors import UserError  # noqa: E402
from lorakit.train import TrainingConfig, pad_collate, train  # noqa: E402
from lorakit.train.batches import BatchOrder, check_one_global_batch  # noqa: E402
from tests import tiny_models  # noqa: E402
from tests.train_job import make_data  # noqa: E402

STEPS = 3


def pissa_model(seed: int) -> torch.nn.Module:
    """The tiny Llama with a PiSSA adapter (randomized SVD: its A, B and the base's residual
    depend on the RNG) drawn after ``torch.manual_seed(seed)``."""
    model = tiny_models.llama()
    torch.manual_seed(seed)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="pissa_niter_2", target_modules=["q_proj", "v_proj"]
    )
    return lorakit.inject(model, config)


def unshardable_model(kind: str) -> torch.nn.Module:
    """A model FSDP refuses: blocks copied by ``layer_replication``, or an int8-rows base."""
    model = tiny_models.llama()
    if kind == "int8_rows":
        from lorakit.quantized.int8_rows import quantize_linears

        quantize_linears(model)
        return lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    replication = [[0, 2], [1, 2]]
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=replication)
    return lorakit.inject(model, config)


def training_config(output: Path, batch_size: int, **extra) -> TrainingConfig:
    return TrainingConfig(
        output_dir=str(output),
        max_steps=STEPS,
        batch_size=batch_size,
        lr=5e-3,
        warmup_steps=1,
        progress=False,
        plot=False,
        seed=3,
        **extra,
    )


def tree_digest(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def error_of(call) -> list[str] | None:
    """``[type name, message]`` of what ``call()`` raised, or None."""
    try:
        call()
    except Exception as error:
        return [type(error).__name__, str(error)]
    return None


def job(out: Path) -> None:
    """Every process: train its own PiSSA model (seed 11 + rank) with FSDP into ``out/run``;
    then, each on a fresh copy of that finished run, what must be refused before anything is
    deleted. Writes ``out/results-<rank>.json``."""
    import torch.distributed as dist

    from lorakit.train.distributed import end_distributed_process

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    data, collate = make_data(), pad_collate(0)
    model = pissa_model(11 + rank)  # a seed per process, as accelerate's device_specific=True
    train(model, data, collate, training_config(out / "run", 2, strategy="fsdp"))
    results = {"run": tree_digest(out / "run")}
    results["save_adapter"] = error_of(lambda: lorakit.save_adapter(model, out / "saved"))
    scenarios = {
        "train_again": lambda: model,
        "layer_replication": lambda: unshardable_model("layer_replication"),
        "int8_rows": lambda: unshardable_model("int8_rows"),
    }
    for name, build in scenarios.items():
        copy = out / f"run-{name}"
        if rank == 0:
            shutil.copytree(out / "run", copy)
        dist.barrier()
        config = training_config(copy, 2, strategy="fsdp", overwrite=True)
        results[name] = error_of(lambda: train(build(), data, collate, config))  # noqa: B023
        dist.barrier()
        results[f"{name} left"] = tree_digest(copy)
    (out / f"results-{rank}.json").write_text(json.dumps(results))
    end_distributed_process(0)


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp39")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(Path(__file__)), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return out, [json.loads((out / f"results-{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_fsdp_trains_process_0s_model_as_one_process_does(torchrun_results, tmp_path):
    """Oracle: one process training the model process 0 built (seed 11), batch 4 = 2 x 2.
    Step 1's loss comes before any update (with PiSSA the base model's own loss), so another
    process's SVD pieces showed there first (review: 4.9313 against 4.9403)."""
    out, _ = torchrun_results
    torch.set_num_threads(1)
    train(pissa_model(11), make_data(), pad_collate(0), training_config(tmp_path / "one", 4))
    losses = {}
    for name, directory in (("fsdp", out / "run"), ("one", tmp_path / "one")):
        with (directory / "metrics.jsonl").open() as lines:
            losses[name] = torch.tensor([json.loads(line)["loss"] for line in lines])
    assert len(losses["one"]) == STEPS
    torch.testing.assert_close(losses["fsdp"], losses["one"], atol=1e-5, rtol=0)
    fsdp = load_file(out / "run" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert fsdp.keys() == one.keys() and len(one) == 8
    for key, tensor in one.items():
        torch.testing.assert_close(fsdp[key], tensor, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layer_replication", "int8_rows"])
def test_fsdp_refusals_come_before_overwrite_deletes(torchrun_results, kind):
    _, results = torchrun_results
    for result in results:
        error = result[kind]
        assert error is not None and error[0] == "UserError", error
        assert "--strategy fsdp cannot shard" in error[1]
        assert result[f"{kind} left"] == result["run"]  # every file, byte for byte


@pytest.mark.slow
def test_the_sharded_model_is_refused_by_save_adapter_and_a_second_train(torchrun_results):
    out, results = torchrun_results
    for result in results:
        for call in ("save_adapter", "train_again"):
            error = result[call]
            assert error is not None and error[0] == "UserError", error
            assert "the model is sharded by FSDP" in error[1] and "adapter/" in error[1]
            assert "lorakit.load_adapter" in error[1]
        assert result["train_again left"] == result["run"]
    assert not (out / "saved").exists()


@pytest.mark.parametrize(
    ("order", "helps", "absent"),
    [
        (BatchOrder(3, 1, 1, 4, drop_last=True), "--nproc-per-node 3", "--batch-size"),
        (BatchOrder(3, 2, 1, 2, drop_last=True), "lower --batch-size,", "--grad-accum"),
        (BatchOrder(1, 1, 1, 2, drop_last=True), "one process", "--nproc-per-node"),
    ],
)
def test_too_little_data_names_only_advice_that_helps(order, helps, absent):
    with pytest.raises(UserError) as refused:
        check_one_global_batch(order)
    advice = str(refused.value).split("no optimizer step would be left. ")[1]
    assert helps in advice.lower() and absent not in advice, advice
    if "--nproc-per-node 3" in advice:  # the advice followed: a global batch of 3 fits
        check_one_global_batch(BatchOrder(3, 1, 1, 3, drop_last=True))


def test_cli_too_little_data_under_4_processes(tmp_path, monkeypatch, capsys, model_dir):
    data = tmp_path / "d3.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "completion": " x"}) + "\n" for i in range(3))
    )
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--batch-size", "1"]
    assert cli.main([*argv, "--steps", "1", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node 3" in err and "Lower --batch-size" not in err, err


def test_a_refused_resume_announces_nothing(tmp_path, monkeypatch, capsys, model_dir):
    """One process with batch 4 on 25 examples keeps the short batch (1 example); 2 processes of
    batch 2 (the same global batch) cannot split it, so their --resume is refused, and that
    error is all they print (the review saw "(resuming after step 2 ...)" first)."""
    from lorakit.train import loop
    from lorakit.train.distributed import Distributed

    data = tmp_path / "d25.jsonl"
    lines = [json.dumps({"prompt": f"Review {i}:", "completion": " ok"}) for i in range(25)]
    data.write_text("\n".join(lines) + "\n")
    output = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--steps", "4"]
    argv += ["--checkpoint-every", "2", "--output", str(output), "--no-progress"]
    assert cli.main([*argv, "--batch-size", "4"]) == 0
    shutil.rmtree(output / "adapter")
    shutil.rmtree(output / "checkpoints" / "step-00000004")
    before = tree_digest(output)
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")  # process 0 of 2 (the process group is not needed
    monkeypatch.setattr(loop, "setup_distributed", lambda *a: Distributed(0, 2, "ddp"))  # here)
    assert cli.main([*argv, "--batch-size", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "resuming after" not in err and "lorakit: training on" not in err, err
    assert err.startswith("lorakit: error: checkpoint") and "short batch" in err, err
    assert tree_digest(output) == before


if __name__ == "__main__":
    job(Path(sys.argv[1]))
