"""``lorakit train``: fine-tune a LoRA adapter on a model (flags, or a YAML/JSON config file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.train.cli_options import TRAIN_DEFAULTS as D

_OPTIONS = [
    # (flag, type, help); "(default: X)" is added from TRAIN_DEFAULTS unless the help says it
    ("--model", str, "model spec: a local transformers directory or a built-in name (a causal LM)"),
    ("--data", str, "training data: rotten-tomatoes, chatterbot, a .jsonl or a .csv file "
                    "(required, here or in --config)"),
    ("--split", str, "split of --data: train/validation/test/all (default: train for "
                     "built-ins, all rows of a file)"),
    ("--eval-data", str, "evaluation data, a spec as for --data (default: no evaluation)"),
    ("--eval-split", str, "split of --eval-data (default: validation for built-ins, all rows "
                          "of a file)"),
    ("--style", str, "chat (the chat template) or plain (prompt/completion) for built-ins and "
                     "CSV (default: chat for built-ins, plain for CSV)"),
    ("--output", str, "output directory (adapter/, checkpoints/, metrics.jsonl, loss_curve.png)"),
    ("--target-modules", str, "comma-separated module names, or all-linear"),
    ("--r", int, "LoRA rank; also --rank, the spelling to use under torchrun (whose parser "
                 "reads --r as an abbreviation of its own options on Python < 3.12)"),
    ("--alpha", float, "lora_alpha (scaling = alpha / r)"),
    ("--dropout", float, "dropout on the LoRA input"),
    ("--lr", float, "peak learning rate (AdamW, warmup then cosine)"),
    ("--steps", int, "optimizer steps, overriding --epochs (default: from --epochs)"),
    ("--epochs", float, "passes over the training data"),
    ("--batch-size", int, "examples per micro-batch (per process)"),
    ("--grad-accum", int, "micro-batches accumulated per optimizer step"),
    ("--max-length", int, "maximum tokens per example: longer reviews (classification data) "
                          "are shortened inside the template, other examples lose their start"),
    ("--warmup-ratio", float, "fraction of the steps spent warming up, in [0, 1]"),
    ("--weight-decay", float, "AdamW weight decay"),
    ("--max-grad-norm", float, "clip the gradient norm to this"),
    ("--loraplus-ratio", float, "LoRA+: B learns at lr * ratio, e.g. 16 (default: off)"),
    ("--eval-every", int, "evaluate every N steps (0: only at the end)"),
    ("--checkpoint-every", int, "write a checkpoint every N steps (0: none)"),
    ("--keep-checkpoints", int, "how many of the newest checkpoints to keep (>= 1)"),
    ("--seed", int, "random seed (adapter initialisation, batches, dropout)"),
]  # fmt: skip


_ALIASES = {"--r": ("--rank",)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter (flags or --config FILE)",
        description=(
            "Train a LoRA adapter with lorakit's loop. Every setting can come from a YAML/JSON "
            "file (--config; keys as the flag names with underscores); flags override the file. "
            "Under torchrun (--nproc_per_node N) it trains data-parallel."
        ),
    )
    parser.add_argument("--config", help="YAML or JSON file with settings (default: none)")
    for flag, kind, text in _OPTIONS:
        if "(default:" not in text and "(required" not in text:
            text += f" (default: {D[flag[2:].replace('-', '_')]})"
        parser.add_argument(flag, *_ALIASES.get(flag, ()), type=kind, default=None, help=text)
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue from the newest checkpoint in --output")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="delete a previous run in --output (adapter/, checkpoints/, "
                             "metrics.jsonl, loss_curve.png, train_settings.json) and start over; "
                             "without it (or --resume) such a directory is refused")  # fmt: skip
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="recompute activations in backward to save memory")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.train.cli_options import merged_settings

    settings = merged_settings(args)
    from lorakit.train.run import train_from_settings

    result = train_from_settings(settings)
    if result.adapter_dir is not None:  # the main process (rank 0 under torchrun)
        print(json.dumps({"steps": result.steps, "final_loss": result.final_loss,
                          **{f"eval_{k}": v for k, v in result.eval_metrics.items()},
                          "adapter": str(result.adapter_dir) if result.adapter_dir else None}))  # fmt: skip
        print(f"adapter saved to {Path(settings['output']) / 'adapter'}")
    return 0
