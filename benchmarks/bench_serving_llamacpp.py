"""Issue 17's serving targets: lorakit's engine beside llama.cpp on the same cores.

Measured in one process at ``--threads`` torch (and llama.cpp) threads, alternating contenders,
medians over ``--repeats``:

- one stream: decode tokens/s of one request (``--tokens`` generated after a 64-token prompt;
  the rate between the first and the last token), for lorakit's engine, llama.cpp
  (``llama_cpp``, the packaged SmolLM2 Q4_1 GGUF) and transformers' ``generate`` (fp32);
- 64 concurrent requests over 64 adapters (rank ``--rank``, all linear layers): aggregate
  generated tokens/s from submitting all at once to the last token, and the same over one
  adapter (the mixed-adapter overhead: 64 adapters' time / 1 adapter's time - 1);
- time to first token of a 64-token prompt on an idle engine (and llama.cpp on a reset context);
- ``--dtype bfloat16``: the same in bf16 (AMX / AVX512-BF16 matmuls where the CPU has them;
  outputs differ from float32's), the adapter bank float32 as ``lorakit serve --dtype bfloat16``
  keeps it (``--bank-dtype bfloat16``: held in bf16, as ``lorakit serve --adapter-dtype
  bfloat16``, products in float32; before 2026-12-06 evening a bf16 bank also multiplied in bf16);
- ``--quantization int8-rows`` / ``int4-groups``: lorakit serves the base as weight-only int8
  (every linear, the output layer included: ``lorakit.quantized.int8_rows``) or 4-bit with a
  scale and offset per 32 inputs (Q4_1's scheme, ``int4_groups``), and reports how far its
  logits are from the float base's (64 random ids); transformers' ``generate`` stays on
  the float model (the baseline of issue 17); outputs differ from float32's;
- ``--one-stream-only``: only the one-stream rates (lorakit's engine and transformers'
  ``generate`` alternated every round, llama.cpp as above) and their ratio;
- the fraction of arithmetic peak a 64-row decode step reaches: its multiply-adds (matmuls of
  the base and the adapters; attention left out) per second over a large fp32 GEMM's rate on the
  same threads (the achievable peak).

EOS is disabled: every request generates exactly its length. llama.cpp runs in a child process
(before lorakit's rounds) and is skipped with a note when ``llama_cpp`` is not installed or the
child fails (the llama-cpp-python 0.3.36 built on the 2026-12-05 machine segfaulted at its
first evaluation). ``--quick``: a tiny random model, no llama.cpp (a smoke run).
``python benchmarks/bench_serving_llamacpp.py --threads 1 [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
import torch
from bench_mixed_adapters import ALL_LINEAR, random_adapter, smollm2_config, versions
from transformers import LlamaForCausalLM

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.openmp import release_idle_team
from lorakit.serve.sampling import SamplingParams

PROMPT = 64  # prompt tokens of the one-stream and TTFT runs


def build(args):
    """(base model, served model, bank with ``--adapters`` adapters)."""
    torch.manual_seed(0)
    if args.quick:
        base = LlamaForCausalLM(smollm2_config(2, tiny=True)).eval()
    else:
        from lorakit.models import load_model

        base, _ = load_model("smollm2-135m-instruct", progress=False)
    base = base.to(getattr(torch, args.dtype))
    base.generation_config.eos_token_id = None
    adapters = [random_adapter(base, ALL_LINEAR, args.rank, seed) for seed in range(args.adapters)]
    served = LlamaForCausalLM(base.config).to(base.dtype).eval()
    served.load_state_dict(base.state_dict())
    served.generation_config.eos_token_id = None
    if args.quantization != "none":
        from lorakit.quantized import int4_groups, int8_rows

        backend = int8_rows if args.quantization == "int8-rows" else int4_groups
        backend.quantize_linears(served)
    prepare_for_serving(served, ALL_LINEAR)
    bank_dtype = None  # lorakit's default: float32 beside a 16-bit base
    if args.bank_dtype is not None:
        bank_dtype = base.dtype if args.bank_dtype == "base" else getattr(torch, args.bank_dtype)
    bank = AdapterBank(served, max_rank=args.rank, capacity=args.adapters, dtype=bank_dtype)
    config = lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR)
    for index, tensors in enumerate(adapters):
        bank.load(f"a{index}", config, tensors)
    return base, served, bank


def prompt(vocab: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def run_requests(engine: Engine, jobs: list[tuple[list[int], str | None, int]]) -> dict:
    """Submit ``jobs`` (prompt, adapter, tokens) at once; first / last token times per job."""
    done = threading.Semaphore(0)
    first, last = {}, {}

    def on_event(index):
        def callback(event):
            now = time.perf_counter()
            if event.token_ids:
                first.setdefault(index, now)
                last[index] = now
            if event.finish_reason is not None:
                done.release()

        return callback

    start = time.perf_counter()
    for index, (ids, adapter, tokens) in enumerate(jobs):
        engine.submit(ids, adapter, SamplingParams(max_tokens=tokens), on_event(index))
    for _ in jobs:
        done.acquire()
    return {"start": start, "first": first, "last": last}


def lorakit_one_stream(engine, vocab, tokens, seed) -> float:
    times = run_requests(engine, [(prompt(vocab, PROMPT, seed), "a0", tokens)])
    return (tokens - 1) / (times["last"][0] - times["first"][0])


def lorakit_ttft(engine, vocab, seed) -> float:
    times = run_requests(engine, [(prompt(vocab, PROMPT, seed), "a0", 1)])
    return times["first"][0] - times["start"]


def lorakit_concurrent(engine, vocab, args, adapters: int) -> float:
    jobs = [
        (prompt(vocab, args.concurrent_prompt, i), f"a{i % adapters}", args.tokens)
        for i in range(args.concurrent)
    ]
    times = run_requests(engine, jobs)
    return len(jobs) * args.tokens / (max(times["last"].values()) - times["start"])


def transformers_one_stream(base, vocab, tokens, seed) -> float:
    ids = torch.tensor([prompt(vocab, PROMPT, seed)])
    with torch.inference_mode():
        start = time.perf_counter()
        base.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        base.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return (tokens - 1) / (time.perf_counter() - start - prefill)


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the packaged GGUF (None when not installed)."""

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama

        from lorakit.export.llama_cpp import weight_repacking
        from lorakit.models import builtin_gguf_file

        self.path = builtin_gguf_file("smollm2-135m-instruct")
        with weight_repacking(False):  # on: a SIGSEGV on this CPU (lorakit.export.llama_cpp)
            self.llm = Llama(
                model_path=str(self.path),
                n_threads=threads,
                n_ctx=1024,
                n_batch=512,
                verbose=False,
            )

    def _stream(self, ids: list[int], tokens: int) -> list[float]:
        self.llm.reset()
        stamps = []
        for _ in self.llm.generate(ids, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        return stamps

    def one_stream(self, vocab, tokens, seed) -> float:
        stamps = self._stream(prompt(vocab, PROMPT, seed), tokens)
        return (tokens - 1) / (stamps[-1] - stamps[0])

    def ttft(self, vocab, seed) -> float:
        start = time.perf_counter()
        stamps = self._stream(prompt(vocab, PROMPT, seed), 1)
        return stamps[0] - start


def peak_macs_per_s(size: int = 1024, repeats: int = 5, dtype=torch.float32) -> float:
    """Multiply-adds per second of a (size x size) GEMM on the current threads (best of)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = min(common_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return size**3 / best


def common_time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_macs(model, rows: int, rank: int) -> float:
    """Multiply-adds of one decode step of ``rows`` rows: every linear (lm_head included) plus
    each row's adapter on all linear layers (rank x (in + out) per layer); attention left out."""
    macs = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            d, k = module.weight.shape
            macs += d * k
            if name.rsplit(".", 1)[-1] in ALL_LINEAR:
                macs += rank * (d + k)
    return rows * macs


def measure(args, base, served, bank) -> dict:
    """Raw samples of every contender, alternated over ``args.repeats`` rounds."""
    vocab = base.config.vocab_size
    raw = {k: [] for k in ("one", "ttft", "mixed", "single", "hf_one")}
    if args.quick:
        note = "--quick: llama.cpp not run"
    else:
        cpp_raw, note = llamacpp_in_child(args, vocab)
        raw |= cpp_raw
    with Engine(served, bank, max_batch=args.concurrent, eos_token_ids=[]) as engine:
        engine.generate([1, 2, 3], "a0", SamplingParams(max_tokens=3))  # warm-up
        for round_ in range(args.repeats):
            raw["one"].append(lorakit_one_stream(engine, vocab, args.tokens, round_))
            if args.one_stream_only:
                raw["hf_one"].append(transformers_one_stream(base, vocab, args.tokens, round_))
                release_idle_team()  # as a server's idle main thread: see serve/openmp.py
                continue
            raw["ttft"].append(lorakit_ttft(engine, vocab, round_))
            raw["mixed"].append(lorakit_concurrent(engine, vocab, args, args.adapters))
            raw["single"].append(lorakit_concurrent(engine, vocab, args, 1))
            if round_ < args.hf_repeats:
                raw["hf_one"].append(transformers_one_stream(base, vocab, args.tokens, round_))
                release_idle_team()
    return {"raw": {k: v for k, v in raw.items() if v}, "note": note}


def llamacpp_in_child(args, vocab: int) -> tuple[dict, str | None]:
    """llama.cpp's raw samples, measured in a child process (before lorakit's rounds, not
    alternated with them): a llama.cpp build that crashes (a segfault) ends only the child."""
    command = [sys.executable, __file__, "--llamacpp-child", str(vocab), "--threads"]
    command += [str(args.threads), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1]), "llama.cpp measured in a child process before lorakit"
    if "No module named 'llama_cpp'" in done.stderr:
        return {}, "llama_cpp (llama-cpp-python) is not installed: llama.cpp skipped"
    return {}, f"llama.cpp failed (exit {done.returncode}, e.g. a crash): skipped"


def llamacpp_child(args) -> int:
    """The child's side: print llama.cpp's raw samples as one JSON line."""
    torch.set_num_threads(args.threads)
    llama, vocab = LlamaCpp(args.threads), args.llamacpp_child
    raw = {"cpp_one": [], "cpp_ttft": []}
    for round_ in range(args.repeats):
        raw["cpp_one"].append(llama.one_stream(vocab, args.tokens, round_))
        raw["cpp_ttft"].append(llama.ttft(vocab, round_))
    print(json.dumps(raw))
    return 0


def llamacpp_problems(raw: dict, floor: float) -> list[str]:
    """Why llama.cpp's samples cannot stand as a comparison (empty: they can). A child that got a
    sliver of a CPU (another job on the machine) reads as a slow llama.cpp and inflates every
    ratio against it: flag per-round rates that spread more than 2x, or fall below ``floor``
    tokens/s, or below a fifth of transformers ``generate``'s one-stream rate on the same
    threads (llama.cpp is normally faster than ``generate``, never 5x slower)."""
    rates = raw.get("cpp_one", [])
    if not rates:
        return []
    problems = []
    if min(rates) <= 0 or max(rates) / min(rates) > 2:
        problems.append(
            f"llama.cpp's one-stream rates vary more than 2x between rounds "
            f"({min(rates):.3g}-{max(rates):.3g} tokens/s)"
        )
    if min(rates) < floor:
        problems.append(
            f"llama.cpp's one-stream rate {min(rates):.3g} tokens/s is below the floor of "
            f"{floor:g} (--llamacpp-floor): its process was starved"
        )
    if raw.get("hf_one"):
        hf = statistics.median(raw["hf_one"])
        if min(rates) < 0.2 * hf:
            problems.append(
                f"llama.cpp's one-stream rate {min(rates):.3g} tokens/s is below a fifth of "
                f"transformers generate's {hf:.3g} on the same threads: its process was starved"
            )
    return problems


def output_error(base, served, vocab: int) -> dict:
    """How far the quantized served model (no adapter) is from the float base on 64 random ids
    (seed 0): the largest logit error over the largest logit, and the share of positions whose
    argmax agrees."""
    ids = torch.tensor([prompt(vocab, 64, seed=0)])
    with torch.inference_mode():
        expected, got = base(ids).logits, served(ids).logits
    return {
        "quantized_max_logit_error": float((got - expected).abs().max() / expected.abs().max()),
        "quantized_argmax_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    }


def main(argv=None) -> int:
    parse = common.parser(__doc__.split("\n")[0], "serving_llamacpp")
    parse.add_argument("--rank", type=int, default=16)
    parse.add_argument("--adapters", type=int, default=64)
    parse.add_argument("--concurrent", type=int, default=64)
    parse.add_argument("--concurrent-prompt", type=int, default=16)
    parse.add_argument("--tokens", type=int, default=64, help="generated per request")
    parse.add_argument("--dtype", default="float32", help="float32 or bfloat16 (base and KV cache)")
    parse.add_argument(
        "--bank-dtype",
        choices=["base", "float32", "bfloat16"],
        default=None,
        help="dtype the adapter bank holds adapters in, as lorakit serve --adapter-dtype "
        "(default: float32, also beside a bfloat16 base); 'base': the base's dtype; products "
        "are float32 either way",
    )
    parse.add_argument("--hf-repeats", type=int, default=1, help="transformers generate runs")
    parse.add_argument(
        "--quantization",
        choices=["none", "int8-rows", "int4-groups"],
        default="none",
        help="the served base: float (--dtype) or lorakit's weight-only int8 / 4-bit",
    )
    parse.add_argument(
        "--one-stream-only",
        action="store_true",
        help="only one-stream decode rates (lorakit and transformers generate every round)",
    )
    parse.add_argument(
        "--llamacpp-floor",
        type=float,
        default=5.0,
        help="llama.cpp one-stream tokens/s below which the run is marked invalid (starved)",
    )
    parse.add_argument("--llamacpp-child", type=int, help=argparse.SUPPRESS)  # vocab size
    args = parse.parse_args(argv)
    if args.llamacpp_child is not None:
        return llamacpp_child(args)
    if args.quick:
        args.adapters, args.concurrent, args.tokens, args.repeats = 4, 4, 4, 1
    torch.set_num_threads(args.threads)
    base, served, bank = build(args)
    result = measure(args, base, served, bank)
    med = {k: statistics.median(v) for k, v in result["raw"].items()}
    summary = {"one_stream_tokens_per_s": med["one"]}
    if not args.one_stream_only:
        peak = peak_macs_per_s(256 if args.quick else 1024, dtype=base.dtype)
        step_seconds = args.concurrent / med["mixed"]  # one decode step of all rows, roughly
        summary |= {
            "ttft_s": med["ttft"],
            "concurrent_tokens_per_s": med["mixed"],
            "concurrent_one_adapter_tokens_per_s": med["single"],
            "mixed_adapter_overhead": med["single"] / med["mixed"] - 1,
            "peak_macs_per_s": peak,
            "fraction_of_peak": step_macs(base, args.concurrent, args.rank) / step_seconds / peak,
        }
    if args.quantization != "none":
        summary |= output_error(base, served, base.config.vocab_size)
    if "hf_one" in med:
        summary["transformers_one_stream_tokens_per_s"] = med["hf_one"]
        paired = zip(result["raw"]["one"], result["raw"]["hf_one"], strict=False)  # by round
        summary["one_stream_vs_transformers"] = statistics.median(one / hf for one, hf in paired)
    if "cpp_one" in med:
        summary |= {
            "llamacpp_one_stream_tokens_per_s": med["cpp_one"],
            "one_stream_vs_llamacpp": med["one"] / med["cpp_one"],
        }
    if "cpp_one" in med and not args.one_stream_only:
        summary |= {
            "llamacpp_ttft_s": med["cpp_ttft"],
            "concurrent_vs_llamacpp_one_stream": med["mixed"] / med["cpp_one"],
            "ttft_vs_llamacpp": med["ttft"] / med["cpp_ttft"],
        }
    problems = llamacpp_problems(result["raw"], args.llamacpp_floor)
    for key, value in summary.items():
        print(f"{key:>40} {value:12.4g}")
    if problems:
        summary |= {"invalid": True, "invalid_reason": "; ".join(problems)}
        for problem in problems:
            print(f"WARNING: invalid comparison with llama.cpp: {problem}", file=sys.stderr)
    if result["note"]:
        print(f"note: {result['note']}")
    payload = {
        "model": "tiny random Llama" if args.quick else "SmolLM2-135M-Instruct (real weights)",
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "versions": versions(),
        "raw": result["raw"],
        "summary": summary,
        "note": result["note"],
    }
    common.write_json(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
