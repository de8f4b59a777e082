"""Serving at scale: a thousand adapters on one engine (issue 21).

``--adapters`` adapter directories (ranks 4-64, q/v-only or all-linear; ten templates with random
weights, hard-linked under new names) are served by one ``Engine`` whose bank holds
``--adapter-memory`` bytes; the rest load on demand on loader threads. Requests arrive as a
Poisson process (``--rate`` per second), adapters drawn by zipf(``--zipf``), prompt and output
lengths from U[8, 32) (EOS disabled). Reported:

- start-up: listing the directory and reading every config and safetensors header (no data);
- throughput of the zipf workload over all adapters vs the same requests all sent to one
  adapter (``ONE_ADAPTER``: rank 16 all-linear, about the mix's mean cost), alternated
  ``--repeats`` times, medians (the target is >= 0.8);
- time to first token p50 / p99 of requests whose adapter was resident at submission (hot) and
  of those that had to be loaded (cold); cold-load latency (read + check + write a slot);
- resident adapter bytes and process RSS as the number of distinct adapters served grows;
- a bounded soak: ``--soak`` seconds of requests while another thread adds and removes adapters
  at runtime (load/unload churn); errors and RSS growth.

Model: the tiny Llama (SmolLM2's family, hidden 64, 2 layers, random weights) by default;
``--smollm2-layers N``: SmolLM2-135M's shapes (hidden 576, vocab 49152) with N layers, random weights;
``--real``: SmolLM2-135M-Instruct through ``lorakit.models``.
``python benchmarks/bench_serving_scale.py [--quick] [--threads 1] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import torch

import lorakit
from lorakit.commands.serve import _adapter_defaults
from lorakit.io import save_adapter
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.serve.sampling import SamplingParams

RANKS = (4, 8, 16, 32, 64)
TARGET_SETS = (["q_proj", "v_proj"], "all-linear")
# The one-adapter baseline: ad0005, rank 16 all-linear, about the mean cost of the mix (mean
# rank 24.8, half of the adapters on 2 of the 7 projections).
ONE_ADAPTER = 5


def base_model(args):
    if args.real:
        from lorakit.models import load_model

        model, _ = load_model("smollm2-135m-instruct", progress=False)
    elif args.smollm2_layers:  # SmolLM2-135M's shapes, fewer layers, random weights
        model = common.base_model(common.smollm2_config(args.smollm2_layers, quick=False))
    else:
        model = common.base_model(common.smollm2_config(2, quick=True))
    model.generation_config.eos_token_id = None
    return model.eval()


def write_adapters(root: Path, count: int, args) -> None:
    """``count`` directories ``ad0000``...: ten templates (ranks x target sets) hard-linked."""
    reference = base_model(args)
    templates = []
    for rank in RANKS:
        for targets in TARGET_SETS:
            name = f"t{rank}{'qv' if isinstance(targets, list) else 'all'}"
            config = lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
            lorakit.inject(reference, config, adapter_name=name)
            templates.append(name)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.02)
    for name in templates:
        save_adapter(reference, root / "templates", name)
    for index in range(count):
        directory = root / "adapters" / f"ad{index:04d}"
        directory.mkdir(parents=True)
        for file in (root / "templates" / templates[index % len(templates)]).iterdir():
            os.link(file, directory / file.name)


def start_server(root: Path, args):
    """(engine, adapters, start-up seconds): listing + headers + model prepared + bank."""
    start = time.perf_counter()
    registry = AdapterRegistry(root / "adapters")
    targets, max_rank, shares = _adapter_defaults(registry)
    listed = time.perf_counter() - start
    model = base_model(args)
    prepare_for_serving(model, targets)
    bank = AdapterBank(
        model,
        max_rank=max_rank,
        memory_budget=args.adapter_memory,
        layer_shares=shares,
        dtype=getattr(torch, args.adapter_dtype),
    )
    adapters = ServedAdapters(bank, registry, model)
    engine = Engine(
        model,
        bank,
        max_batch=args.max_batch,
        max_loras=args.max_loras,
        adapter_loader=adapters.read,
    )
    return engine.start(), adapters, listed, time.perf_counter() - start


def workload(args, names: list[str], vocab: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, len(names) + 1, dtype=torch.float64) ** args.zipf
    gaps = torch.empty(args.requests, dtype=torch.float64).exponential_(
        args.rate, generator=generator
    )
    picks = torch.multinomial(weights, args.requests, replacement=True, generator=generator)
    return [
        dict(
            arrival=arrival,
            adapter=names[int(pick)],
            prompt=torch.randint(
                0,
                vocab,
                (int(torch.randint(8, 32, (1,), generator=generator)),),
                generator=generator,
            ).tolist(),
            output=int(torch.randint(8, 32, (1,), generator=generator)),
        )
        for arrival, pick in zip(torch.cumsum(gaps, 0).tolist(), picks.tolist(), strict=True)
    ]


def serve_run(engine: Engine, requests: list[dict]) -> dict:
    """Submit on the arrival schedule; TTFT split by whether the adapter was resident."""
    done, first, finish, errors = threading.Semaphore(0), {}, {}, []

    def on_event(index):
        def callback(event):
            now = time.perf_counter()
            if event.token_ids and index not in first:
                first[index] = now
            if event.finish_reason is not None:
                finish[index] = now
                if event.finish_reason == "error":
                    errors.append(event.error)
                done.release()

        return callback

    start, submitted, cold = time.perf_counter(), {}, set()
    for index, request in enumerate(requests):
        delay = start + request["arrival"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if request["adapter"] not in engine.bank:
            cold.add(index)
        submitted[index] = time.perf_counter()
        params = SamplingParams(max_tokens=request["output"])
        engine.submit(request["prompt"], request["adapter"], params, on_event(index))
    for _ in requests:
        done.acquire()
    elapsed = max(finish.values()) - start
    ttft = {
        kind: sorted(first[i] - submitted[i] for i in first if (i in cold) == (kind == "cold"))
        for kind in ("hot", "cold")
    }
    return {
        "seconds": elapsed,
        "tokens_per_s": sum(r["output"] for r in requests) / elapsed,
        "errors": len(errors),
        "cold_requests": len(cold),
        **{f"ttft_{kind}_p50": _pct(v, 0.5) for kind, v in ttft.items()},
        **{f"ttft_{kind}_p99": _pct(v, 0.99) for kind, v in ttft.items()},
    }


def _pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def cold_load_seconds(adapters: ServedAdapters, names: list[str]) -> list[float]:
    """Read + check + write one adapter into the bank, for adapters not resident."""
    times = []
    for name in names:
        if name in adapters.bank:
            continue
        start = time.perf_counter()
        adapters.ensure_loaded(name)
        times.append(time.perf_counter() - start)
    return times


def rss_bytes() -> int:
    return common.rss_kib("VmRSS") * 1024


def memory_growth(engine, adapters, names: list[str], steps: list[int]) -> list[dict]:
    """Resident adapter bytes and RSS after serving the first k adapters once each."""
    rows, served = [], 0
    for k in steps:
        for name in names[served:k]:
            engine.generate([1, 2, 3], name, SamplingParams(max_tokens=1))
        served = k
        rows.append(
            dict(
                adapters_served=k,
                loaded=adapters.bank.loaded_count,
                resident_bytes=adapters.bank.resident_bytes(),
                bank_bytes=adapters.bank.memory_bytes(),
                rss_bytes=rss_bytes(),
            )
        )
    return rows


def soak(engine, adapters, names: list[str], seconds: float, vocab: int) -> dict:
    """Requests from 4 client threads while a churn thread adds and removes adapters."""
    stop, errors, churned, requests = threading.Event(), [], [0], [0]
    root = adapters.registry.root
    rss_start = rss_bytes()

    def client(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            name = rng.choice(names)
            _, _, last = engine.generate(
                [rng.randrange(vocab) for _ in range(8)], name, SamplingParams(max_tokens=8)
            )
            requests[0] += 1
            if last.finish_reason != "length":
                errors.append(f"{name}: {last.finish_reason} {last.error}")

    def churn():
        rng = random.Random(99)
        while not stop.is_set():
            source = rng.choice(names)
            name = f"churn{churned[0]}"
            adapters.add(name, os.path.relpath(adapters.registry.path(source), root))
            _, _, last = engine.generate([1, 2], name, SamplingParams(max_tokens=2))
            if last.finish_reason != "length":
                errors.append(f"{name}: {last.finish_reason} {last.error}")
            adapters.remove(name)
            churned[0] += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=churn))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return dict(
        seconds=seconds,
        requests=requests[0],
        churn_cycles=churned[0],
        errors=errors[:10],
        error_count=len(errors),
        rss_start=rss_start,
        rss_end=rss_bytes(),
        resident_bytes=adapters.bank.resident_bytes(),
        bank_bytes=adapters.bank.memory_bytes(),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--real", action="store_true", help="SmolLM2-135M-Instruct (lorakit.models)"
    )
    parser.add_argument(
        "--smollm2-layers", type=int, default=0, help="SmolLM2-135M shapes with N layers"
    )
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--adapter-memory", type=int, default=16_000_000, help="bytes")
    parser.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype the bank holds adapters in (lorakit serve --adapter-dtype)",
    )
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals per second")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument(
        "--max-loras", type=int, default=None, help="distinct adapters a step at most"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--soak", type=float, default=20.0, help="soak seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(common.RESULTS / "serving_scale.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.repeats, args.soak = 40, 12, 1, 1.0
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_adapters(root, args.adapters, args)
        engine, adapters, listed, startup = start_server(root, args)
        try:
            result = measure(args, engine, adapters, listed, startup)
        finally:
            engine.stop()
    report(args, result)
    return 0


def measure(args, engine, adapters, listed, startup) -> dict:
    names = adapters.registry.names()
    vocab = engine.model.config.vocab_size
    engine.generate([1, 2, 3], names[0], SamplingParams(max_tokens=2))  # warm-up
    raw = {"one": [], "zipf": []}
    for repeat in range(args.repeats):
        shuffled = random.Random(repeat).sample(names, len(names))  # other hot set each time
        zipf = workload(args, shuffled, vocab, seed=repeat)
        one = [dict(r, adapter=names[ONE_ADAPTER]) for r in zipf]
        raw["one"].append(serve_run(engine, one))
        raw["zipf"].append(serve_run(engine, zipf))
    medians = {
        kind: {
            k: statistics.median(r[k] for r in runs if r[k] is not None)
            for k in runs[0]
            if any(r[k] is not None for r in runs)
        }
        for kind, runs in raw.items()
    }
    cold = cold_load_seconds(adapters, random.Random(7).sample(names, min(20, len(names))))
    steps = [k for k in (10, 100, 300, 1000) if k <= len(names)] or [len(names)]
    growth = memory_growth(engine, adapters, names, steps)
    soaked = soak(engine, adapters, names, args.soak, vocab)
    return dict(
        startup_listing_s=listed,
        startup_total_s=startup,
        raw=raw,
        medians=medians,
        zipf_over_one=medians["zipf"]["tokens_per_s"] / medians["one"]["tokens_per_s"],
        cold_load_s_p50=statistics.median(cold) if cold else None,
        cold_load_s_max=max(cold) if cold else None,
        memory=growth,
        soak=soaked,
        bank=dict(
            pages=adapters.bank.pages,
            page_rank=adapters.bank.page_rank,
            slots=adapters.bank.capacity,
            bytes=adapters.bank.memory_bytes(),
            evictions=adapters.bank.evictions,
        ),
        cold_loads_started=engine.cold_loads,
    )


def report(args, result: dict) -> None:
    m = result["medians"]
    print(
        f"start-up: listing {result['startup_listing_s']:.2f} s, total {result['startup_total_s']:.2f} s"
    )
    rows = []
    for kind in ("one", "zipf"):
        r = m[kind]
        rows.append(
            (
                kind,
                f"{r['tokens_per_s']:.1f}",
                _s(r.get("ttft_hot_p50")),
                _s(r.get("ttft_hot_p99")),
                _s(r.get("ttft_cold_p50")),
                _s(r.get("ttft_cold_p99")),
                str(int(r["errors"])),
            )
        )
    print(
        common.table(
            rows, ("workload", "tok/s", "hot p50", "hot p99", "cold p50", "cold p99", "errors")
        )
    )
    print(
        f"zipf / one adapter: {result['zipf_over_one']:.2f}; cold load p50 {_s(result['cold_load_s_p50'])}"
    )
    for row in result["memory"]:
        print(
            f"after {row['adapters_served']:5d} adapters: resident {row['resident_bytes'] / 1e6:.1f} MB of {row['bank_bytes'] / 1e6:.1f} MB, RSS {row['rss_bytes'] / 1e6:.0f} MB"
        )
    s = result["soak"]
    print(
        f"soak {s['seconds']:.0f} s: {s['requests']} requests, {s['churn_cycles']} load/unload cycles, {s['error_count']} errors, RSS {s['rss_start'] / 1e6:.0f} -> {s['rss_end'] / 1e6:.0f} MB"
    )
    if args.real:
        model = "SmolLM2-135M-Instruct (real weights)"
    elif args.smollm2_layers:
        model = f"SmolLM2-135M shapes, {args.smollm2_layers} layers, random weights"
    else:
        model = "tiny Llama (hidden 64, 2 layers, random weights)"
    payload = {
        "model": model,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": common.versions(),
        **result,
    }
    common.write_json(Path(args.out), payload)


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    sys.exit(main())
