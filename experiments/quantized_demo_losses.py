"""Why the demo on the GGUF Q4_1 base scored 73.5% against 80.5% on the float base
(docs/quantized.md, "The demo on a quantized base"): the first steps of the demo's training on
the float base (fast path), the float base forced onto the plain path
(``lorakit.fast.plain_path()``, the path a quantized base takes) and the GGUF base, per-step
losses side by side, with and without LoRA dropout. Several minutes a run on a loaded CPU:

    python3 experiments/quantized_demo_losses.py --steps 6 --dropout 0.0
    python3 experiments/quantized_demo_losses.py --steps 6 --dropout 0.05
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import lorakit.fast
from lorakit.demo import DemoSettings, _train
from lorakit.models import load_model

RUNS = {"float": (None, False), "float-plain": (None, True), "gguf": ("gguf", False)}


def losses(name: str, steps: int, dropout: float, output: Path) -> list[float]:
    """Per-step training losses of the demo's first ``steps`` steps on base ``name``."""
    quantization, plain = RUNS[name]
    model, tokenizer = load_model(
        "smollm2-135m-instruct", progress=False, quantization=quantization
    )
    settings = DemoSettings(output=str(output / name), steps=steps, dropout=dropout, progress=False)
    with lorakit.fast.plain_path() if plain else nullcontext():
        result, _, _ = _train(model, tokenizer, settings, output / name)
    lines = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    return [round(line["loss"], 5) for line in lines if "loss" in line]


def main() -> None:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--steps", type=int, default=6)
    parse.add_argument("--dropout", type=float, default=0.05)
    parse.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parse.add_argument("--output", type=Path, default=Path("/tmp/quantized-demo-losses"))
    args = parse.parse_args()
    torch.set_num_threads(1)
    for name in args.runs:
        start = time.time()
        values = losses(name, args.steps, args.dropout, args.output)
        print(f"{name:12} dropout {args.dropout}: {values} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
