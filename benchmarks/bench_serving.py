"""Workload 6 of docs/performance.md: serving many adapters with the engine.

Requests arrive as a Poisson process (``--rate`` per second), each asks for an adapter drawn by
zipf(``--zipf``) over 1, 8 or 64 adapters (S-LoRA's generator), with prompt and output lengths
drawn from U[8, 64) (EOS disabled: every request generates exactly its length). Reported per
adapter count: generated tokens/s, requests/s, time to first token p50 / p99; the ratio of each
throughput to the one-adapter run (to hold near 1); and the naive baseline: a PEFT model with
every adapter loaded, serving the same requests one at a time in arrival order, switching adapters
per request (``set_adapter`` + ``generate``), on the first ``--peft-requests`` requests.

Model: SmolLM2-135M's LlamaConfig with ``--layers`` layers and random weights (the real model
with ``--real`` when ``lorakit.models`` is available). Before any timed run, one unmeasured
burst of ``--max-batch`` requests at the workload's lengths (U[8, 64) prompt and output) warms the
engine up. The adapter counts are then run over ``--repeats`` rounds (default 3), the order of the
counts rotated each round (1, 8, 64; then 8, 64, 1; ...) so no count always runs first; medians
reported, and the ratio to one adapter as the median of the per-round ratios. ``python benchmarks/bench_serving.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from pathlib import Path

import common
import torch
from bench_mixed_adapters import ALL_LINEAR, build_peft, random_adapter, smollm2_config, versions
from transformers import LlamaForCausalLM

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.sampling import SamplingParams


def workload(args, adapter_count: int, vocab: int) -> list[dict]:
    """Arrival times, adapter, prompt ids and output length of every request (seeded)."""
    generator = torch.Generator().manual_seed(1)
    weights = 1.0 / torch.arange(1, adapter_count + 1, dtype=torch.float64) ** args.zipf
    gaps = torch.empty(args.requests, dtype=torch.float64).exponential_(
        args.rate, generator=generator
    )
    arrivals = torch.cumsum(gaps, 0).tolist()
    requests = []
    for arrival in arrivals:
        prompt_length = int(torch.randint(8, 64, (1,), generator=generator))
        requests.append(
            dict(
                arrival=arrival,
                adapter=f"a{int(torch.multinomial(weights, 1, generator=generator))}",
                prompt=torch.randint(0, vocab, (prompt_length,), generator=generator).tolist(),
                output=int(torch.randint(8, 64, (1,), generator=generator)),
            )
        )
    return requests


def warm_up(engine: Engine, args, vocab: int) -> dict:
    """One unmeasured burst of ``max_batch`` requests at realistic lengths, all arriving at once."""
    generator = torch.Generator().manual_seed(12345)
    requests = [
        dict(
            arrival=0.0,
            adapter=f"a{index % max(args.counts)}",
            prompt=torch.randint(
                0,
                vocab,
                (int(torch.randint(8, 64, (1,), generator=generator)),),
                generator=generator,
            ).tolist(),
            output=int(torch.randint(8, 64, (1,), generator=generator)),
        )
        for index in range(args.max_batch)
    ]
    return serve_run(engine, requests)


def rotated(counts: list[int], round_index: int) -> list[int]:
    """The counts in the order of round ``round_index``: rotated by one each round."""
    shift = round_index % len(counts)
    return counts[shift:] + counts[:shift]


def serve_run(engine: Engine, requests: list[dict]) -> dict:
    """Submit on the arrival schedule; measure TTFT and throughput."""
    done = threading.Semaphore(0)
    first, finish = {}, {}

    def on_event(index):
        def callback(event):
            now = time.perf_counter()
            if event.token_ids and index not in first:
                first[index] = now
            if event.finish_reason is not None:
                finish[index] = now
                done.release()

        return callback

    start = time.perf_counter()
    submitted = {}
    for index, request in enumerate(requests):
        delay = start + request["arrival"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted[index] = time.perf_counter()
        params = SamplingParams(max_tokens=request["output"])
        engine.submit(request["prompt"], request["adapter"], params, on_event(index))
    for _ in requests:
        done.acquire()
    return summary(requests, submitted, first, finish, start)


def summary(requests, submitted, first, finish, start) -> dict:
    elapsed = max(finish.values()) - start
    ttft = sorted(first[i] - submitted[i] for i in first)
    tokens = sum(r["output"] for r in requests)
    return {
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(requests) / elapsed,
        "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
    }


def peft_run(peft_model, requests: list[dict]) -> dict:
    """One request at a time in arrival order, switching the active adapter per request."""
    start = time.perf_counter()
    submitted, first, finish = {}, {}, {}
    with torch.no_grad():
        for index, request in enumerate(requests):
            arrival = start + request["arrival"]
            if time.perf_counter() < arrival:
                time.sleep(arrival - time.perf_counter())
            submitted[index] = arrival
            peft_model.set_adapter(request["adapter"])
            ids = torch.tensor([request["prompt"]])
            n = request["output"]
            out = peft_model.generate(
                input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
            assert out.shape[1] == ids.shape[1] + n
            finish[index] = time.perf_counter()
            first[index] = finish[index]  # no streaming: the first token comes with the last
    return summary(requests, submitted, first, finish, start)


def build(args):
    torch.manual_seed(0)
    if args.real:
        from lorakit.models import load_model

        base, _ = load_model("smollm2-135m-instruct")
    else:
        base = LlamaForCausalLM(smollm2_config(args.layers, tiny=args.quick)).eval()
    base.generation_config.eos_token_id = None
    config = lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets)
    adapters = [
        random_adapter(base, args.targets, args.rank, seed) for seed in range(max(args.counts))
    ]
    served = copy.deepcopy(base)
    prepare_for_serving(served, args.targets)
    bank = AdapterBank(served, max_rank=args.rank, capacity=len(adapters))
    for index, tensors in enumerate(adapters):
        bank.load(f"a{index}", config, tensors)
    return base, served, bank, adapters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--real", action="store_true", help="the real SmolLM2-135M via lorakit.models"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ALL_LINEAR))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--peft-requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=20.0, help="Poisson arrivals per second")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds; the counts' order rotates each round"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    args = parser.parse_args(argv)
    args.targets = args.targets.split(",")
    args.counts = [1, 8, 64]
    if args.quick:
        args.layers, args.requests, args.peft_requests, args.counts = 1, 6, 3, [1, 4]
    torch.set_num_threads(args.threads)
    base, served, bank, adapters = build(args)
    raw = {count: [] for count in args.counts}
    orders = []
    vocab = base.config.vocab_size
    with Engine(served, bank, max_batch=args.max_batch, eos_token_ids=[]) as engine:
        warm = warm_up(engine, args, vocab)  # unmeasured: first-run costs land here
        for round_index in range(args.repeats):
            order = rotated(args.counts, round_index)
            orders.append(order)
            for count in order:
                result = serve_run(engine, workload(args, count, vocab))
                result["round"] = round_index
                raw[count].append(result)
    peft_model = build_peft(base, adapters, args)
    peft_requests = workload(args, max(args.counts), vocab)[: args.peft_requests]
    peft = peft_run(peft_model, peft_requests)
    report(args, raw, peft, orders, warm, base.config)
    return 0


def report(args, raw, peft, orders, warm, model_config) -> None:
    keys = ("seconds", "tokens_per_s", "requests_per_s", "ttft_p50", "ttft_p99")
    medians = {
        c: {k: statistics.median(r[k] for r in runs) for k in keys} for c, runs in raw.items()
    }
    first = args.counts[0]
    # the ratio to one adapter: per round (same stretch of machine time), then the median
    ratios = {
        c: statistics.median(
            run["tokens_per_s"] / raw[first][i]["tokens_per_s"] for i, run in enumerate(runs)
        )
        for c, runs in raw.items()
    }
    print(
        f"{'adapters':>8} {'tok/s':>8} {'req/s':>6} {'ttft p50':>9} {'ttft p99':>9} {'vs 1':>5} {'vs peft':>8}"
    )
    for count, m in medians.items():
        print(
            f"{count:8d} {m['tokens_per_s']:8.1f} {m['requests_per_s']:6.2f} {m['ttft_p50']:9.3f} {m['ttft_p99']:9.3f} "
            f"{ratios[count]:5.2f} {m['tokens_per_s'] / peft['tokens_per_s']:8.1f}"
        )
    print(
        f"{'peft':>8} {peft['tokens_per_s']:8.1f} {peft['requests_per_s']:6.2f} {peft['ttft_p50']:9.3f} {peft['ttft_p99']:9.3f}"
    )
    layers = model_config.num_hidden_layers  # (--layers is the argument; --real ignores it)
    model = (
        f"SmolLM2-135M-Instruct (real weights, {layers} layers)"
        if args.real
        else f"SmolLM2-135M config, {layers} layers, random weights"
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "layers")}
    payload = {
        "workload": 6,
        "model": model,
        "settings": {
            **settings,
            "layers": layers,
            "hidden_size": model_config.hidden_size,
            "layers_argument": args.layers,
        },
        "versions": versions(),
        "raw": {str(c): runs for c, runs in raw.items()},
        "medians": {str(c): m for c, m in medians.items()},
        "tokens_per_s_vs_one_adapter_median_of_rounds": {str(c): r for c, r in ratios.items()},
        "orders": orders,
        "warm_up_unmeasured": warm,
        "peft_switching": peft,
    }
    common.write_json(Path(args.out), payload)


if __name__ == "__main__":
    sys.exit(main())
