"""A small training job on a tiny random Llama, run as a subprocess by the resume (SIGKILL), DDP
and FSDP tests. ``python tests/train_job.py OUTPUT_DIR [--resume] [--slow SECONDS] ...``.
The data is fixed (seeded), the adapter is initialised from a fixed seed, dropout is on.
Each process writes ``OUTPUT_DIR/process-<rank>.json``: its pid, and the bytes of the parameters
it holds at the end (``lorakit.train.fsdp.local_parameter_bytes``) and its peak RSS."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "src"), str(_ROOT)]  # this checkout's lorakit, and tests.

import lorakit  # noqa: E402
from lorakit.train import TrainingConfig, pad_collate, train  # noqa: E402
from lorakit.train.distributed import end_distributed_process  # noqa: E402
from lorakit.train.fsdp import local_parameter_bytes  # noqa: E402
from tests import tiny_models  # noqa: E402


def make_data(
    count: int = 48, seed: int = 5, uneven_answers: bool = False
) -> list[dict[str, list[int]]]:
    """Classification-style examples: a marker token (5 or 6) then 2-7 random tokens; the marker
    picks the 2-token completion ([10, 11] or [20, 21]); loss only on the completion.
    ``uneven_answers``: the completion is 1-6 tokens long instead (10, 11, ... or 20, 21, ...),
    so a mean per micro-batch and a mean over the step's tokens differ."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        marker = 5 + int(torch.randint(0, 2, (1,), generator=generator))
        prompt = [marker, *torch.randint(30, 128, (length - 1,), generator=generator).tolist()]
        completion = [10, 11] if marker == 5 else [20, 21]
        if uneven_answers:
            size = int(torch.randint(1, 7, (1,), generator=generator))
            completion = list(range(completion[0], completion[0] + size))
        examples.append({"input_ids": prompt + completion, "labels": [-100] * length + completion})
    return examples


def q_proj_model(seed: int = 3) -> torch.nn.Module:
    """The tiny Llama with an r=2 adapter on q_proj, its A drawn from ``seed``."""
    torch.manual_seed(seed)
    return lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))


def build_model(dropout: float) -> torch.nn.Module:
    model = tiny_models.llama()
    torch.manual_seed(11)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    return lorakit.inject(model, config)


def run(argv: list[str] | None = None) -> torch.nn.Module:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow", type=float, default=0.0, help="sleep per micro-batch (s)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate on 8 more examples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(args.dropout)
    report = Path(args.output_dir) / f"process-{os.environ.get('RANK', '0')}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"pid": os.getpid()}))
    collate = pad_collate(0)

    def slow_collate(examples):
        time.sleep(args.slow)
        return collate(examples)

    config = TrainingConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=5e-3,
        warmup_steps=2,
        checkpoint_every=args.checkpoint_every,
        progress=False,
        plot=False,
        seed=3,
        strategy=args.strategy,
        eval_every=args.eval_every,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    eval_data = make_data(8, seed=6) if args.eval_every else None
    train(model, make_data(), slow_collate, config, eval_data=eval_data, resume=args.resume)
    held = local_parameter_bytes(model)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report.write_text(json.dumps({"pid": os.getpid(), **held, "peak_rss": peak_rss}))
    return model


if __name__ == "__main__":
    run()
    end_distributed_process(0)  # under torchrun: no interpreter finalization (its docstring)
