"""Workload 3 of docs/performance.md: mixed-adapter batches.

One forward of a batch whose sequences each use their own adapter, drawn from a pool of 1, 8,
32 or 128 adapters by identical / uniform / distinct / zipf(1.5) choice: prefill (8 x 64) and
decode (32 x 1, one new token per sequence, no KV cache: the adapter cost is per token).
Contenders, alternated in one process, medians of the repeats:

    base      the model without adapters (the floor)
    single    lorakit, one adapter active for every row (plain unmerged forward)
    mixed     lorakit serving: AdapterBank + batched op (lorakit.serve.routed)
    peft      peft, the same adapters, ``adapter_names=`` per row

SmolLM2-135M shapes (its LlamaConfig; ``--layers`` of its 30), random weights; the model level
times the decoder stack (no LM head); the layer level times one (d x k) layer with a per-token
choice (so prefill can hold 32 or 128 distinct adapters). Medians of seconds per call.

Usage: ``PYTHONPATH=src python benchmarks/bench_mixed_adapters.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import common
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving, routed

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_config(layers: int, tiny: bool = False) -> LlamaConfig:
    """SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json), ``layers`` of 30.

    ``tiny``: a 64-wide model with a 128-token vocabulary instead (``--quick``, for tests)."""
    if tiny:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=256,
        )
    return common.smollm2_config(layers, quick=False)  # bos 1, eos 2: LlamaConfig's defaults


def random_adapter(model, targets, rank, seed) -> dict[str, torch.Tensor]:
    """PEFT-keyed random A, B (non-zero) for every target linear of ``model``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            d, k = module.weight.shape
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, k, generator=generator) / k**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d, rank, generator=generator) * 0.01
    return tensors


def choose(kind: str, rows: int, pool: int, generator: torch.Generator) -> list[int]:
    """Adapter index per row: punica's identical / uniform / distinct / zipf(1.5)."""
    if kind == "identical":
        return [0] * rows
    if kind == "uniform":
        return torch.randint(0, pool, (rows,), generator=generator).tolist()
    if kind == "distinct":
        return [i % pool for i in range(rows)]
    weights = 1.0 / torch.arange(1, pool + 1, dtype=torch.float64) ** 1.5
    return torch.multinomial(weights, rows, replacement=True, generator=generator).tolist()


def build(args):
    torch.manual_seed(0)
    base = LlamaForCausalLM(smollm2_config(args.layers, tiny=args.quick)).eval()
    config = lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets)
    adapters = [
        random_adapter(base, args.targets, args.rank, seed) for seed in range(max(args.pools))
    ]
    single = lorakit.inject(copy.deepcopy(base), config, adapter_name="a0")
    with torch.no_grad():
        for path, layer in lorakit.state.lora_layers(single):
            lora_A, lora_B = layer.adapter_parameters("a0")
            lora_A.copy_(adapters[0][f"base_model.model.{path}.lora_A.weight"])
            lora_B.copy_(adapters[0][f"base_model.model.{path}.lora_B.weight"])
    served = copy.deepcopy(base)
    prepare_for_serving(served, args.targets)
    bank = AdapterBank(served, max_rank=args.rank, capacity=len(adapters))
    for index, tensors in enumerate(adapters):
        bank.load(f"a{index}", config, tensors)
    return base, single, served, bank, adapters


def build_peft(base, adapters, args, targets=None):
    import peft

    targets = targets or args.targets
    peft_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
    model = peft.get_peft_model(copy.deepcopy(base), peft_config, adapter_name="a0")
    for index in range(1, len(adapters)):
        model.add_adapter(f"a{index}", peft_config)
    state = {}
    for index, tensors in enumerate(adapters):
        for key, value in tensors.items():
            state[key.replace(".weight", f".a{index}.weight")] = value
    missing = set(state) - set(model.state_dict())
    assert not missing, sorted(missing)[:3]
    model.load_state_dict(state, strict=False)
    return model.eval()


def timed(fn, inner: int) -> float:
    """Seconds per call, over ``inner`` back-to-back calls (so one sample lasts >= ~50 ms and a
    scheduler preemption on a shared machine is averaged out).

    ``fn.session`` (if set) is a context manager factory entered once around the ``inner`` calls,
    inside the timed span: per-generation setup that a real caller pays once per sample, not once
    per step (PEFT's ``generate(adapter_names=...)`` enters its routing hooks once)."""
    session = getattr(fn, "session", contextlib.nullcontext)
    start = time.perf_counter()
    with session():
        for _ in range(inner):
            fn()
    return (time.perf_counter() - start) / inner


def contenders(single, served, bank, peft_model, ids, picks):
    """The decoder stack only (``model.model``): the LM head, which no adapter touches, would
    otherwise dominate decode at few layers. PEFT's per-row routing is entered through the same
    context manager its own ``forward`` / ``generate(adapter_names=...)`` uses, once per sample
    around the timed loop (as ``generate`` enters it once per generation, not once per step)."""
    slots = torch.tensor([bank.slot_of(f"a{p}") for p in picks])[:, None].expand(ids.shape)
    names = [f"a{p}" for p in picks]
    peft_stack = peft_model.base_model.model.model

    def run_base():
        with lorakit.disabled(single):
            single.model(ids)

    def run_single():
        single.model(ids)

    def run_mixed():
        with routed(bank, slots):
            served.model(ids)

    def run_peft():
        peft_stack(input_ids=ids)

    def peft_session():
        return peft_model.base_model._enable_peft_forward_hooks(adapter_names=names)

    run_peft.session = peft_session

    return {"base": run_base, "single": run_single, "mixed": run_mixed, "peft": run_peft}


def measure(runs: dict, repeats: int, sample_seconds: float = 0.05) -> dict[str, list[float]]:
    """Alternate the contenders (A B C D, A B C D, ...) after a warm-up; seconds per call."""
    raw = {name: [] for name in runs}
    with torch.no_grad():
        fastest = min(timed(run, 1) for run in runs.values() for _ in range(2))
        inner = min(200, max(1, int(sample_seconds / fastest)))
        for _ in range(repeats):
            for name, run in runs.items():
                raw[name].append(timed(run, inner))
    return raw


class OneLinear(torch.nn.Module):
    """One SmolLM2-shaped linear layer (``proj``), for the layer-level comparison."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(k, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_level(args) -> list[dict]:
    """Per-token adapter choice on one (d x k) layer: rows = tokens (prefill 512, decode 32)."""
    d, k = args.layer_shape
    torch.manual_seed(0)
    base = OneLinear(d, k).eval()
    adapters = [random_adapter(base, ["proj"], args.rank, seed) for seed in range(max(args.pools))]
    config = lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["proj"])
    single = lorakit.inject(copy.deepcopy(base), config, adapter_name="a0")
    served = copy.deepcopy(base)
    prepare_for_serving(served, ["proj"])
    bank = AdapterBank(served, max_rank=args.rank, capacity=len(adapters))
    for index, tensors in enumerate(adapters):
        bank.load(f"a{index}", config, tensors)
    peft_layer = build_peft(base, adapters, args, targets=["proj"]).base_model.model.proj
    generator, rows = torch.Generator().manual_seed(0), []
    for phase, shape, pool, kind in cases(args):
        tokens = shape[0] * shape[1]
        x = torch.randn(tokens, k, generator=generator)
        picks = choose(kind, tokens, pool, generator)
        slots = torch.tensor([bank.slot_of(f"a{p}") for p in picks])
        names = [f"a{p}" for p in picks]

        def run_mixed(x=x, slots=slots):
            with routed(bank, slots):
                served(x)

        runs = {
            "base": lambda x=x: base(x),
            "single": lambda x=x: single(x),
            "mixed": run_mixed,
            "peft": lambda x=x, names=names: peft_layer(x, adapter_names=names),
        }
        rows.append(
            summarise(
                "layer",
                phase,
                shape,
                pool,
                kind,
                picks,
                measure(runs, args.repeats, args.sample_seconds),
            )
        )
    return rows


def summarise(level, phase, shape, pool, kind, picks, raw) -> dict:
    median = {name: statistics.median(times) for name, times in raw.items()}
    row = dict(
        level=level,
        phase=phase,
        shape=list(shape),
        pool=pool,
        choice=kind,
        distinct=len(set(picks)),
        raw=raw,
        median=median,
        mixed_over_single=median["mixed"] / median["single"],
        mixed_over_peft=median["mixed"] / median["peft"],
        peft_over_base=median["peft"] / median["base"],
        mixed_over_base=median["mixed"] / median["base"],
    )
    print(
        f"{level:5s} {phase:8s} {pool:4d} {kind:9s} distinct={row['distinct']:3d}  mixed/single={row['mixed_over_single']:.2f}  "
        f"mixed/peft={row['mixed_over_peft']:.2f}  mixed/base={row['mixed_over_base']:.2f}  "
        f"peft/base={row['peft_over_base']:.2f}  (mixed {median['mixed'] * 1e3:.2f} ms)",
        flush=True,
    )
    return row


def cases(args):
    for phase, shape in (("prefill", (8, 64)), ("decode", (32, 1))):
        if phase not in args.phases:
            continue
        yield phase, shape, 1, "identical"
        for pool in args.pools[1:]:
            for kind in ("uniform", "distinct", "zipf"):
                yield phase, shape, pool, kind


def model_level(args) -> list[dict]:
    """Whole-model forwards, one adapter per sequence (prefill: at most 8 distinct)."""
    base, single, served, bank, adapters = build(args)
    peft_model = build_peft(base, adapters, args)
    generator, rows = torch.Generator().manual_seed(0), []
    for phase, shape, pool, kind in cases(args):
        ids = torch.randint(0, base.config.vocab_size, shape, generator=generator)
        picks = choose(kind, shape[0], pool, generator)
        raw = measure(
            contenders(single, served, bank, peft_model, ids, picks),
            args.repeats,
            args.sample_seconds,
        )
        rows.append(summarise("model", phase, shape, pool, kind, picks, raw))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ALL_LINEAR))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument(
        "--levels", default="layer,model", help="layer (one d x k layer), model, or both"
    )
    parser.add_argument(
        "--layer-shape", default="1536x576", help="d x k of the layer-level layer (up_proj)"
    )
    parser.add_argument("--phases", default="prefill,decode")
    parser.add_argument(
        "--pools", default="1,8,32,128", help="adapter pool sizes (the first: one adapter)"
    )
    parser.add_argument("--sample-seconds", type=float, default=0.05, help="length of one sample")
    parser.add_argument("--out", default="benchmarks/results/mixed_adapters.json")
    args = parser.parse_args(argv)
    args.targets = args.targets.split(",")
    args.levels = args.levels.split(",")
    args.phases = args.phases.split(",")
    args.layer_shape = tuple(int(n) for n in args.layer_shape.split("x"))
    args.pools = [int(n) for n in args.pools.split(",")]
    if args.quick:
        args.layers, args.repeats, args.pools, args.layer_shape = 1, 1, [1, 4], (96, 64)
        args.sample_seconds = 0.0
    torch.set_num_threads(args.threads)
    rows = layer_level(args) if "layer" in args.levels else []
    if "model" in args.levels:
        rows += model_level(args)
    write(args, rows)
    return 0


def versions() -> dict[str, str]:
    return common.versions() | {
        "lorakit": lorakit.__version__,
        "threads": str(torch.get_num_threads()),
    }


def write(args, rows) -> None:
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"workload": 3, "settings": settings, "versions": versions(), "rows": rows}
    common.write_json(Path(args.out), payload)


if __name__ == "__main__":
    sys.exit(main())
