"""Workload: DoRA beside LoRA, lorakit beside PEFT, in one process (issue 15's targets).

SmolLM2-135M shapes (fewer layers), all-linear r=16 alpha=32, non-zero A and B, fp32.
Training: a step (forward, backward, AdamW) of batch 4 x 128 at dropout 0 and 0.05; contenders
``lora`` (lorakit LoRA), ``dora`` (lorakit DoRA), ``peft-dora``; plus the bytes each forward saves
for backward (parameters left out). Inference (unmerged, no KV cache, as bench_inference.py):
prefill 4 x 128 and one-token forwards at batch 1 and 32. Serving: the adapter bank with 32
adapters, one per row, all LoRA vs half DoRA (decode 32 x 1 and 32 rows x 16 tokens).

    python benchmarks/bench_dora.py [--quick] [--threads 1] [--layers 2] [--repeats 3] [--vocab N]
"""

from __future__ import annotations

import copy
import time

import common
import torch

SHAPES = {"prefill 4x128": (4, 128, 1), "decode 1x1": (1, 1, 20), "decode 32x1": (32, 1, 10)}


def fields(dropout: float, use_dora: bool) -> dict:
    return dict(
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        use_dora=use_dora,
    )


def build(base, dropout: float) -> dict:
    """``{"lora", "dora", "peft-dora"}`` models with the same random A and B (and m)."""
    import peft

    import lorakit

    lora = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields(dropout, False)))
    dora = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields(dropout, True)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields(dropout, True)))
    generator = torch.Generator().manual_seed(1)
    dora_state = dora.state_dict()
    with torch.no_grad():
        for key, value in lora.state_dict().items():
            if ".lora_A." in key or ".lora_B." in key:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.02)
                dora_state[key].copy_(value)
        peft_state = {"base_model.model." + k: v for k, v in dora_state.items() if "lora_" in k}
    missing = set(peft_state) - set(theirs.state_dict())
    assert not missing, f"keys peft does not have: {sorted(missing)[:3]}"
    theirs.load_state_dict(peft_state, strict=False)
    return {"lora": lora.train(), "dora": dora.train(), "peft-dora": theirs.train()}


def training(models: dict, ids: torch.Tensor, repeats: int) -> dict:
    steps, saved = {}, {}
    for name, model in models.items():
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()

        steps[name] = step
        forward = lambda model=model: model(input_ids=ids, labels=ids).loss  # noqa: E731
        saved[name] = common.saved_tensor_bytes(forward, list(model.parameters()))
    return {"times_s": common.alternate(steps, repeats), "saved_bytes": saved}


def inference(models: dict, vocab: int, repeats: int, quick: bool) -> dict:
    for model in models.values():
        model.eval()
    results = {}
    for label, (batch, length, calls) in SHAPES.items():
        if quick:
            batch, length, calls = min(batch, 2), min(length, 16), 1
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))
        runs = {
            name: (
                lambda model=model, ids=ids, calls=calls: [
                    model(input_ids=ids) for _ in range(calls)
                ]
            )
            for name, model in models.items()
        }
        with torch.inference_mode():
            logits = {name: model(input_ids=ids).logits for name, model in models.items()}
            difference = (logits["dora"] - logits["peft-dora"]).abs().max().item()
            times = common.alternate(runs, repeats)
        results[label] = {
            "times_s": times,
            "calls_per_round": calls,
            "max_abs_logit_diff_dora_vs_peft": difference,
        }
    return results


def serving(base, vocab: int, repeats: int, quick: bool) -> dict:
    """A mixed batch of 32 adapters (one per row), all LoRA vs half DoRA, through the bank:
    decode 32 x 1 and 32 rows x 16 tokens."""
    import lorakit
    from lorakit.serve import AdapterBank, prepare_for_serving, routed

    model = copy.deepcopy(base).eval()
    prepare_for_serving(model, "all-linear")
    layers = {name: layer.base_layer for name, layer in lorakit.state.lora_layers(model)}
    generator = torch.Generator().manual_seed(5)
    banks = {kind: AdapterBank(model, max_rank=16, capacity=32) for kind in ("lora", "half-dora")}
    for index in range(32):
        tensors = {}
        for path, base_layer in layers.items():
            d, k = base_layer.weight.shape
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(16, k, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d, 16, generator=generator) * 0.02
            noise = 1 + 0.1 * torch.randn(d, generator=generator)
            tensors[f"{prefix}.lora_magnitude_vector"] = base_layer.weight.norm(dim=1) * noise
        for kind, bank in banks.items():
            use_dora = kind == "half-dora" and index % 2 == 1
            config = lorakit.LoraConfig(**fields(0.0, use_dora))
            kept = {key: v for key, v in tensors.items() if use_dora or "magnitude" not in key}
            bank.load(f"a{index}", config, kept)
    results = {}
    for label, length in (("mixed decode 32x1", 1), ("mixed 32x16", 16)):
        length = min(length, 4) if quick else length
        ids = torch.randint(0, vocab, (32, length), generator=torch.Generator().manual_seed(6))
        slots = {
            kind: torch.tensor([bank.slot_of(f"a{i}") for i in range(32)])[:, None]
            for kind, bank in banks.items()
        }

        def run(kind, ids=ids, slots=slots, length=length):
            with routed(banks[kind], slots[kind].expand(32, length)):
                model(input_ids=ids)

        runs = {kind: (lambda kind=kind, run=run: run(kind)) for kind in banks}
        with torch.inference_mode():
            results[label] = {"times_s": common.alternate(runs, repeats), "calls_per_round": 1}
    return results


def report(train: dict, infer: dict) -> str:
    rows = []
    for setting, result in train.items():
        t = {name: common.median(values) for name, values in result["times_s"].items()}
        saved = result["saved_bytes"]
        rows.append(
            (
                f"train {setting}",
                f"{t['lora']:.3f}",
                common.ratio(t["dora"], t["lora"]),
                common.ratio(t["dora"], t["peft-dora"]),
                common.ratio(t["peft-dora"], t["lora"]),
                f"{saved['lora'] / 2**20:.1f} / {saved['dora'] / 2**20:.1f} / "
                f"{saved['peft-dora'] / 2**20:.1f}",
            )
        )
    for label, result in infer.items():
        t = {name: common.median(values) for name, values in result["times_s"].items()}
        per_call = t["lora"] / result["calls_per_round"]
        rows.append(
            (
                label,
                f"{per_call:.4f}",
                common.ratio(t["dora"], t["lora"]),
                common.ratio(t["dora"], t["peft-dora"]),
                common.ratio(t["peft-dora"], t["lora"]),
                "-",
            )
        )
    header = (
        "workload",
        "lora s",
        "dora/lora",
        "dora/peft-dora",
        "peft-dora/lora",
        "saved MiB lora / dora / peft-dora",
    )
    return common.table(rows, header)


def main() -> None:
    parse = common.parser(__doc__.splitlines()[0], "dora")
    parse.add_argument(
        "--vocab", type=int, default=None, help="vocabulary size (default: SmolLM2's 49152)"
    )
    args = parse.parse_args()
    torch.set_num_threads(args.threads)
    clock = common.set_clock(args.clock, args.threads)
    config = common.smollm2_config(args.layers, args.quick)
    if args.vocab is not None:  # a small vocabulary: the adapted layers dominate the step
        config.vocab_size = args.vocab
    base = common.base_model(config).train()
    batch, length = (2, 16) if args.quick else (4, 128)
    ids = torch.randint(
        0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2)
    )
    start = time.perf_counter()
    train = {}
    for dropout in (0.0, 0.05):
        train[f"dropout={dropout}"] = training(build(base, dropout), ids, args.repeats)
        print(f"done training dropout={dropout} at {time.perf_counter() - start:.0f} s", flush=True)
    infer = inference(build(base, 0.0), config.vocab_size, args.repeats, args.quick)
    served = serving(base, config.vocab_size, args.repeats, args.quick)
    print(report(train, infer))
    for label, result in served.items():
        t = {name: common.median(values) for name, values in result["times_s"].items()}
        print(
            f"{label}: all LoRA {t['lora']:.4f} s, half DoRA / all LoRA "
            f"{common.ratio(t['half-dora'], t['lora'])}"
        )
    common.write_json(
        args.out,
        {
            "workload": "dora",
            "threads": args.threads,
            "clock": clock,
            "layers": args.layers,
            "quick": args.quick,
            "vocab": config.vocab_size,
            "versions": common.versions(),
            "training": train,
            "inference": infer,
            "serving": served,
        },
    )


if __name__ == "__main__":
    main()
