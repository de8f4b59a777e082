"""What each torchrun process holds when training a LoRA adapter with DDP and with FSDP
(``lorakit train --strategy``): parameter bytes (the local pieces under FSDP) and RSS.

    python benchmarks/bench_fsdp_memory.py [--model smollm2-135m-instruct] [--processes 2]
                                           [--steps 2] [--out results/fsdp_memory.json]

The script starts ``torchrun --nproc_per_node N`` on itself once per strategy; every process
loads the model (float32), adds an all-linear r=8 adapter, trains ``--steps`` steps of one
64-token example per process and reports its parameter bytes after training and its RSS before
loading (Python, torch, transformers), after loading (the weights are memory-mapped, mostly not
yet read), after training and at its peak. The workers run with OMP_NUM_THREADS=1 and
MALLOC_MMAP_THRESHOLD_=131072: without a fixed threshold glibc raises it after each large free,
keeps FSDP's freed all-gather buffers in its heap and the RSS then measures the allocator, not
what the process holds (measured: FSDP's RSS after training 1.5-1.9 GB against 0.8 GB).
The per-rank numbers (bytes) go to ``--out`` (JSON) with the settings and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # puts this checkout's lorakit on sys.path

MB = 1e6
STRATEGIES = ("ddp", "fsdp")
WORKER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
TOKENS = 64  # one example of 64 random tokens per process and step


def rss_bytes() -> int:
    """The process's resident set now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    import torch

    import lorakit
    from lorakit.models import load_model
    from lorakit.train import TrainingConfig, pad_collate, train
    from lorakit.train.fsdp import local_parameter_bytes

    torch.set_num_threads(1)
    before_load = rss_bytes()
    model, _ = load_model(args.model, progress=False)
    after_load = rss_bytes()
    torch.manual_seed(0)
    config = lorakit.LoraConfig(**LORA)
    lorakit.inject(model, config)
    generator = torch.Generator().manual_seed(1)
    vocabulary = model.config.vocab_size
    examples = [
        {"input_ids": torch.randint(0, vocabulary, (TOKENS,), generator=generator).tolist()}
        for _ in range(8 * args.steps)
    ]
    for example in examples:
        example["labels"] = example["input_ids"]
    training = TrainingConfig(
        output_dir=args.output,
        max_steps=args.steps,
        batch_size=1,
        progress=False,
        plot=False,
        strategy=args.strategy,
    )
    train(model, examples, pad_collate(0), training)
    report = {
        **local_parameter_bytes(model),
        "rss_before_load": before_load,
        "rss_after_load": after_load,
        "rss_after_training": rss_bytes(),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    rank = os.environ.get("RANK", "0")
    Path(args.output, f"memory-{rank}.json").write_text(json.dumps(report))


def measure(args: argparse.Namespace, strategy: str) -> list[dict[str, int]]:
    output = tempfile.mkdtemp(prefix=f"fsdp-memory-{strategy}-")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.processes),
        __file__,
        "--worker",
        "--strategy",
        strategy,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--output",
        output,
    ]
    environment = {**os.environ, **WORKER_ENVIRONMENT}
    subprocess.run(command, check=True, env=environment, capture_output=True)
    return [
        json.loads(Path(output, f"memory-{rank}.json").read_text())
        for rank in range(args.processes)
    ]


def print_table(args: argparse.Namespace, ranks: dict[str, list[dict[str, int]]]) -> None:
    """The per-rank numbers of ``ranks`` (``{strategy: [per rank]}``), in MB (1e6 bytes)."""
    print(f"{args.model}, {args.processes} processes, MB = 1e6 bytes")
    print(
        f"{'strategy':<9}{'rank':>5}{'frozen MB':>11}{'adapter MB':>12}{'RSS start':>10}"
        f"{'RSS load':>10}{'RSS end':>9}{'RSS peak':>10}{'end-start':>10}"
    )
    for strategy, held_by_rank in ranks.items():
        for rank, held in enumerate(held_by_rank):
            print(
                f"{strategy:<9}{rank:>5}{held['frozen'] / MB:>11.1f}{held['trainable'] / MB:>12.2f}"
                f"{held['rss_before_load'] / MB:>10.0f}{held['rss_after_load'] / MB:>10.0f}"
                f"{held['rss_after_training'] / MB:>9.0f}{held['peak_rss'] / MB:>10.0f}"
                f"{(held['rss_after_training'] - held['rss_before_load']) / MB:>10.0f}"
            )


def results(args: argparse.Namespace, ranks: dict[str, list[dict[str, int]]]) -> dict:
    """The JSON payload: ``ranks`` (``{strategy: [per rank: bytes]}``) with what produced it."""
    settings = {
        "dtype": "float32",
        "lora": LORA,
        "tokens_per_example": TOKENS,
        "batch_size_per_process": 1,
        "worker_environment": WORKER_ENVIRONMENT,
        "unit": "bytes",
    }
    return {
        "model": args.model,
        "processes": args.processes,
        "steps": args.steps,
        "settings": settings,
        "ranks": ranks,
        "versions": common.versions(),
    }


def main(argv: list[str] | None = None) -> None:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--model", default="smollm2-135m-instruct")
    parse.add_argument("--processes", type=int, default=2)
    parse.add_argument("--steps", type=int, default=2)
    parse.add_argument("--out", type=Path, default=common.RESULTS / "fsdp_memory.json")
    parse.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parse.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parse.add_argument("--output", help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.worker:
        worker(args)
        return
    ranks = {strategy: measure(args, strategy) for strategy in STRATEGIES}
    print_table(args, ranks)
    common.write_json(args.out, results(args, ranks))


if __name__ == "__main__":
    main()
