"""Peak memory (RSS) of LoRA training on SmolLM2-135M for each kind of frozen base (issue 14).

One child process per base (``float32``, ``bfloat16``, ``int8``, ``nf4``, ``gguf``), each:
load the packaged SmolLM2-135M-Instruct with ``lorakit.models.load_model`` (the base the CLI's
``--quantization`` gives), inject the demo's adapter (r=16, alpha 32, dropout 0.05, the seven
projections), run ``--steps`` AdamW steps on random token batches of the demo's size (8 x 96),
and report the process's resident memory: after loading (the freed load-time buffers returned
to the OS first, ``malloc_trim``), and its high-water mark during the training steps
(``VmHWM``, reset before the first step through ``/proc/self/clear_refs``). ``training - loaded`` is what training adds on top of the model:
activations kept for backward, gradients, optimizer state, workspace. RSS is a process-wide
measure, so each base runs in its own process; the numbers are not ratios of one process and
move by a few MiB between runs. The table prints MiB (2**20 bytes); the JSON holds bytes.

``--quick``: a tiny random Llama, float32 and bfloat16 only (proves it runs).
``python benchmarks/bench_training_rss.py [--bases float32 nf4] [--steps 3] [--out FILE]``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import common
import torch

BASES = ("float32", "bfloat16", "int8", "nf4", "gguf")
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trimmed_rss() -> int:
    """RSS after returning the allocator's free pages to the OS (glibc ``malloc_trim``)."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return common.rss_kib("VmRSS") * 1024


def load_base(base: str, quick: bool):
    """SmolLM2-135M as ``base`` (``--quick``: a tiny random Llama, float bases only)."""
    dtype = torch.bfloat16 if base == "bfloat16" else torch.float32
    if quick:
        return common.base_model(common.smollm2_config(2, quick=True), dtype)
    from lorakit.models import load_model

    quantization = None if base in ("float32", "bfloat16") else base
    model, _ = load_model(
        "smollm2-135m-instruct", dtype=dtype, progress=False, quantization=quantization
    )
    return model


def child(base: str, args) -> dict:
    """Load ``base``, train ``args.steps`` steps; the memory readings in bytes."""
    import lorakit

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = common.rss_kib("VmRSS") * 1024
    model = load_base(base, args.quick)
    config = lorakit.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=SEVEN_PROJECTIONS
    )
    lorakit.inject(model, config)
    model.train()
    loaded = trimmed_rss()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    vocab = model.config.vocab_size
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    for step in range(args.steps):
        ids = torch.randint(3, vocab, (8, 96), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = common.rss_kib("VmHWM") * 1024
    return {
        "base": base,
        "process_start": start,
        "loaded": loaded,
        "training_peak": peak,
        "training_added": peak - loaded,
        "final_loss": float(loss),
    }


def run_child(base: str, args) -> dict:
    command = [sys.executable, __file__, "--child", base, "--steps", str(args.steps)]
    command += ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"base": base, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parse = common.parser(__doc__.split("\n")[0], "training_rss")
    parse.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES))
    parse.add_argument("--steps", type=int, default=3)
    parse.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    bases = [b for b in args.bases if b in ("float32", "bfloat16")] if args.quick else args.bases
    rows = [run_child(base, args) for base in bases]
    mib = 2**20  # the table's unit; the JSON holds bytes
    print("| base | after loading (MiB) | training peak (MiB) | added by training (MiB) |")
    print("|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['base']} | failed: {row['error']} | | |")
            continue
        print(
            f"| {row['base']} | {row['loaded'] / mib:,.0f} | {row['training_peak'] / mib:,.0f} "
            f"| {row['training_added'] / mib:,.0f} |"
        )
    settings = {
        "steps": args.steps,
        "threads": args.threads,
        "batch": "8 x 96",
        "quick": args.quick,
        "unit": "bytes",  # rows' process_start, loaded, training_peak, training_added
    }
    common.write_json(args.out, {"settings": settings, "rows": rows, "versions": common.versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
