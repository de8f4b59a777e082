"""Workload 2: unmerged and merged inference, lorakit and PEFT, each against the base model.

SmolLM2-135M shapes (fewer layers), all-linear r=16 alpha=32 with non-zero B, fp32; a forward of
batch 4 x 128 (prefill) and one-token forwards at batch 1 and 32 (the linear-layer shapes of a
decode step; no KV cache, so every contender does the same work). Contenders: ``base`` (no
adapters), ``lorakit`` / ``peft`` unmerged, ``lorakit-plain`` (``lorakit.fast.plain_path()``),
``lorakit-merged`` / ``peft-merged``.

    python benchmarks/bench_inference.py [--quick] [--threads 2] [--layers 8] [--repeats 5]
"""

from __future__ import annotations

import copy

import common
import torch
from bench_training import build

SHAPES = {"prefill 4x128": (4, 128, 1), "decode 1x1": (1, 1, 20), "decode 32x1": (32, 1, 10)}


def contenders(base):
    import lorakit
    import lorakit.fast

    ours, theirs = build(base, dropout=0.0)
    ours_merged = lorakit.merge(copy.deepcopy(ours))
    theirs_merged, _ = copy.deepcopy(theirs), None
    theirs_merged.merge_adapter()
    models = {
        "base": base,
        "lorakit": ours,
        "peft": theirs,
        "lorakit-merged": ours_merged,
        "peft-merged": theirs_merged,
    }
    for model in models.values():
        model.eval()

    def plain(ids):
        with lorakit.fast.plain_path():
            return ours(input_ids=ids)

    return models, plain


def run_shape(models, plain, shape, vocab, repeats):
    batch, length, calls = shape
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))

    def forward(model):
        def run():
            for _ in range(calls):
                model(input_ids=ids)

        return run

    runs = {name: forward(model) for name, model in models.items()}
    runs["lorakit-plain"] = lambda: [plain(ids) for _ in range(calls)]
    with torch.inference_mode():
        reference = models["base"](input_ids=ids).logits
        check = {
            n: (m(input_ids=ids).logits - reference).abs().max().item() for n, m in models.items()
        }
        times = common.alternate(runs, repeats)
    return {"times_s": times, "calls_per_round": calls, "max_abs_logit_change": check}


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], "inference").parse_args()
    torch.set_num_threads(args.threads)
    clock = common.set_clock(args.clock, args.threads)
    config = common.smollm2_config(args.layers, args.quick)
    models, plain = contenders(common.base_model(config))
    results = {}
    for label, shape in SHAPES.items():
        shape = (min(shape[0], 2), min(shape[1], 16), 1) if args.quick else shape
        results[label] = run_shape(models, plain, shape, config.vocab_size, args.repeats)
    rows = []
    for label, result in results.items():
        t = {name: common.median(values) for name, values in result["times_s"].items()}
        rows.append(
            (
                label,
                f"{t['base'] / result['calls_per_round'] * 1e3:.2f}",
                *(
                    f"{t[name] / t['base']:.3f}"
                    for name in (
                        "lorakit",
                        "peft",
                        "lorakit-plain",
                        "lorakit-merged",
                        "peft-merged",
                    )
                ),
            )
        )
    print(
        common.table(
            rows,
            (
                "shape",
                "base ms",
                "lorakit/base",
                "peft/base",
                "plain/base",
                "lorakit merged/base",
                "peft merged/base",
            ),
        )
    )
    common.write_json(
        args.out,
        {
            "workload": "inference",
            "threads": args.threads,
            "clock": clock,
            "layers": args.layers,
            "quick": args.quick,
            "versions": common.versions(),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
