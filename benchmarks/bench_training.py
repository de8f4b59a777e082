"""Workload 1: a LoRA training step, lorakit beside PEFT and beside the frozen-base floor.

SmolLM2-135M shapes (fewer layers), all-linear r=16 alpha=32, batch 4 x 128, AdamW; settings
fp32 with dropout 0.05 and 0.0, and a bf16 base with fp32 adapters (dropout 0.05); fused AdamW
on both sides (lorakit's trainer optimizer; transformers' Trainer default). Contenders:
``lorakit`` (fast path), ``lorakit-plain`` (``lorakit.fast.plain_path()``), ``peft``, and
``frozen`` (fully frozen model, ``inputs_embeds.requires_grad_()``, forward + backward: the floor
of any LoRA step). Memory: bytes saved for backward (deterministic, each storage once, parameters
left out; ``full-ft`` = full fine-tuning for scale) and the peak-RSS delta of a step.

    python benchmarks/bench_training.py [--quick] [--threads 2] [--layers 8] [--repeats 5]
        [--setting 0 1 2] [--memory-only] [--shape smollm2|layers|1b]

``--shape layers`` / ``1b``: layer-dominated Llamas (hidden 384 x 4 layers / hidden 2048 x 2
layers, vocab 2000), where the adapted layers carry almost all the compute.
"""

from __future__ import annotations

import copy
import time

import common
import torch

SETTINGS = [
    ("fp32", torch.float32, 0.05),
    ("fp32", torch.float32, 0.0),
    ("bf16", torch.bfloat16, 0.05),
]


def lora_fields(dropout: float) -> dict:
    return dict(
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def build(base, dropout: float):
    """(lorakit model, peft model) with identical non-zero adapter weights, and their optimizers."""
    import peft

    import lorakit

    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**lora_fields(dropout)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_fields(dropout)))
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, value in ours.state_dict().items():
        if "lora_" in key:
            value.copy_(torch.randn(value.shape, generator=generator) * 0.02)
            state["base_model.model." + key] = value
    theirs.load_state_dict(state, strict=False)
    return ours.train(), theirs.train()


def step_functions(base, ours, theirs, ids):
    import lorakit.fast
    import lorakit.train

    def training_step(model, optimizer, **inputs):
        def run():
            optimizer.zero_grad(set_to_none=True)
            model(**inputs, labels=ids).loss.backward()
            optimizer.step()

        return run

    # Each side's own default: lorakit's trainer optimizer (fused AdamW on CPU), and the fused
    # AdamW that transformers' Trainer uses by default on torch >= 2.8 ("adamw_torch_fused").
    ours_opt = lorakit.train.build_optimizer(ours, lr=1e-4)
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    theirs_opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    lorakit_step = training_step(ours, ours_opt, input_ids=ids)

    def lorakit_plain():
        with lorakit.fast.plain_path():
            lorakit_step()

    def frozen():
        embeds = base.get_input_embeddings()(ids).detach().requires_grad_()
        base(inputs_embeds=embeds, labels=ids).loss.backward()

    return {
        "lorakit": lorakit_step,
        "peft": training_step(theirs, theirs_opt, input_ids=ids),
        "lorakit-plain": lorakit_plain,
        "frozen": frozen,
    }


def memory(base, ours, theirs, ids, steps, repeats):
    """Saved-for-backward bytes per contender (and full fine-tuning), and peak-RSS deltas."""
    import lorakit.fast

    def forward(model, **inputs):
        return lambda: model(**inputs, labels=ids).loss

    def plain_forward():
        with lorakit.fast.plain_path():
            return ours(input_ids=ids, labels=ids).loss

    def frozen_forward():
        embeds = base.get_input_embeddings()(ids).detach().requires_grad_()
        return base(inputs_embeds=embeds, labels=ids).loss

    full = copy.deepcopy(base).train().requires_grad_(True)
    forwards = {
        "lorakit": forward(ours, input_ids=ids),
        "peft": forward(theirs, input_ids=ids),
        "lorakit-plain": plain_forward,
        "frozen": frozen_forward,
        "full-ft": forward(full, input_ids=ids),
    }
    saved = {}
    for name, run in forwards.items():
        model = {"peft": theirs, "full-ft": full}.get(name, ours if "lorakit" in name else base)
        saved[name] = common.saved_tensor_bytes(run, list(model.parameters()))
    del full
    rss = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            rss[name].append(common.peak_rss_delta(run))
    return saved, rss


def run_setting(args, label, dtype, dropout) -> dict:
    config = common.model_config(args.shape, args.layers, args.quick)
    base = common.base_model(config, dtype).train()
    ours, theirs = build(base, dropout)
    batch, length = (2, 16) if args.quick else (4, 128)
    ids = torch.randint(
        0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2)
    )
    steps = step_functions(base, ours, theirs, ids)
    start = time.perf_counter()
    times = {} if args.memory_only else common.alternate(steps, args.repeats)
    saved, rss = memory(base, ours, theirs, ids, steps, max(1, min(3, args.repeats)))
    return {
        "setting": f"{label} dropout={dropout}",
        "dtype": label,
        "dropout": dropout,
        "times_s": times,
        "saved_bytes": saved,
        "rss_delta_bytes": rss,
        "seconds": time.perf_counter() - start,
    }


def report(results: list[dict]) -> str:
    rows = []
    for result in results:
        t = {name: common.median(values) for name, values in result["times_s"].items()}
        saved = result["saved_bytes"]
        added = {name: saved[name] - saved["frozen"] for name in ("lorakit", "peft")}
        rss = {n: common.median(v) for n, v in result["rss_delta_bytes"].items() if None not in v}
        rows.append(
            (
                result["setting"],
                f"{t['lorakit']:.3f}" if t else "-",
                common.ratio(t.get("lorakit"), t.get("peft")),
                common.ratio(t.get("lorakit"), t.get("frozen")),
                common.ratio(t.get("peft"), t.get("frozen")),
                common.ratio(t.get("lorakit-plain"), t.get("peft")),
                f"{saved['lorakit'] / 2**20:.1f} / {saved['peft'] / 2**20:.1f}",
                common.ratio(saved["lorakit"], saved["peft"]),
                common.ratio(added["lorakit"], added["peft"]),
                f"{saved['lorakit'] / saved['full-ft']:.2f} / {saved['peft'] / saved['full-ft']:.2f}",
                common.ratio(rss.get("lorakit"), rss.get("peft")),
            )
        )
    header = (
        "setting",
        "lorakit s/step",
        "lorakit/peft",
        "lorakit/frozen",
        "peft/frozen",
        "plain/peft",
        "saved MiB lorakit / peft",
        "saved lorakit/peft",
        "saved above frozen lorakit/peft",
        "saved vs full-ft lorakit / peft",
        "rss lorakit/peft",
    )
    return common.table(rows, header)


def main() -> None:
    parse = common.parser(__doc__.splitlines()[0], "training")
    parse.add_argument(
        "--setting",
        type=int,
        nargs="+",
        choices=range(len(SETTINGS)),
        help="indices into " + ", ".join(f"{d} p={p}" for d, _, p in SETTINGS),
    )
    parse.add_argument(
        "--shape",
        choices=sorted(common.SHAPES),
        default="smollm2",
        help="smollm2 (--layers of SmolLM2-135M); layers: hidden 384 x 4 layers, vocab 2000; "
        "1b: hidden 2048 x 2 layers (layer-dominated, issue 16)",
    )
    parse.add_argument("--memory-only", action="store_true", help="skip the timed rounds")
    args = parse.parse_args()
    torch.set_num_threads(args.threads)
    clock = common.set_clock(args.clock, args.threads)
    settings = SETTINGS[:1] if args.quick else SETTINGS
    if args.setting is not None:
        settings = [SETTINGS[index] for index in args.setting]
    results = []
    for setting in settings:
        results.append(run_setting(args, *setting))
        print(f"done {results[-1]['setting']} in {results[-1]['seconds']:.0f} s", flush=True)
    print(report(results))
    # what was built: --shape layers / 1b fix their own layer count, --quick a tiny model
    built = common.model_config(args.shape, args.layers, args.quick)
    common.write_json(
        args.out,
        {
            "workload": "training step",
            "threads": args.threads,
            "clock": clock,
            "layers": built.num_hidden_layers,
            "layers_argument": args.layers,
            "hidden_size": built.hidden_size,
            "intermediate_size": built.intermediate_size,
            "vocab_size": built.vocab_size,
            "shape": args.shape,
            "quick": args.quick,
            "versions": common.versions(),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
