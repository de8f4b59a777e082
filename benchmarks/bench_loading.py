"""Workload 4: loading one adapter (all-linear r=16 on SmolLM2-135M shapes) into a model with no
adapter, and the 100th into a model that already holds 99: ``lorakit.io.load_adapter`` beside
PEFT (``PeftModel.from_pretrained`` / ``load_adapter`` + ``set_adapter``) and beside the floor, a
raw ``safetensors.torch.load_file`` of the same file. Each round loads, times, then removes the
adapter again (untimed), contenders alternating.

    python benchmarks/bench_loading.py [--quick] [--threads 2] [--layers 8] [--repeats 5]
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import common
import torch


def save_adapter(base, directory: Path) -> None:
    import lorakit
    import lorakit.io

    model = lorakit.inject(
        copy.deepcopy(base),
        lorakit.LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False
        ),
    )
    lorakit.io.save_adapter(model, directory)


def timed_rounds(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """``contenders[name] = (load, remove)``; one warm-up round, then ``repeats`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(repeats + 1):
        for name, (load, remove) in contenders.items():
            start = common.now()
            load()
            elapsed = common.now() - start
            remove()
            if round_index:
                times[name].append(elapsed)
    return times


def first_adapter(base, directory: Path, repeats: int):
    import peft
    from safetensors.torch import load_file

    import lorakit
    import lorakit.io

    ours, theirs_base = copy.deepcopy(base), copy.deepcopy(base)
    holder = {}

    def peft_load():
        holder["peft"] = peft.PeftModel.from_pretrained(theirs_base, directory)

    return timed_rounds(
        {
            "raw": (lambda: load_file(directory / "adapter_model.safetensors"), lambda: None),
            "lorakit": (
                lambda: lorakit.io.load_adapter(ours, directory, activate=True),
                lambda: lorakit.unload(ours),
            ),
            "peft": (peft_load, lambda: holder.pop("peft").unload()),
        },
        repeats,
    )


def nth_adapter(base, directory: Path, count: int, repeats: int):
    import peft
    from safetensors.torch import load_file

    import lorakit
    import lorakit.io

    ours = copy.deepcopy(base)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory, adapter_name="a0")
    for index in range(count - 1):
        lorakit.io.load_adapter(ours, directory, f"a{index}")
        if index:
            theirs.load_adapter(directory, adapter_name=f"a{index}")
    last = f"a{count - 1}"

    def peft_load():
        theirs.load_adapter(directory, adapter_name=last)
        theirs.set_adapter(last)

    return timed_rounds(
        {
            "raw": (lambda: load_file(directory / "adapter_model.safetensors"), lambda: None),
            "lorakit": (
                lambda: lorakit.io.load_adapter(ours, directory, last, activate=True),
                lambda: lorakit.delete_adapter(ours, last),
            ),
            "peft": (peft_load, lambda: (theirs.set_adapter("a0"), theirs.delete_adapter(last))),
        },
        repeats,
    )


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], "loading").parse_args()
    torch.set_num_threads(args.threads)
    clock = common.set_clock(args.clock, args.threads)
    base = common.base_model(common.smollm2_config(args.layers, args.quick))
    count = 5 if args.quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapter"
        save_adapter(base, directory)
        results = {
            "1st": first_adapter(base, directory, args.repeats),
            f"{count}th": nth_adapter(base, directory, count, args.repeats),
        }
    medians = {k: {n: common.median(v) for n, v in r.items()} for k, r in results.items()}
    rows = [
        (
            k,
            f"{m['raw'] * 1e3:.1f}",
            f"{m['lorakit'] * 1e3:.1f}",
            f"{m['peft'] * 1e3:.1f}",
            f"{m['lorakit'] / m['raw']:.2f}",
            f"{m['lorakit'] / m['peft']:.3f}",
        )
        for k, m in medians.items()
    ]
    first, nth = medians.values()
    print(
        common.table(
            rows, ("adapter", "raw ms", "lorakit ms", "peft ms", "lorakit/raw", "lorakit/peft")
        )
    )
    print(
        f"lorakit {count}th / 1st: {nth['lorakit'] / first['lorakit']:.3f}; "
        f"peft: {nth['peft'] / first['peft']:.3f}"
    )
    common.write_json(
        args.out,
        {
            "workload": "adapter loading",
            "threads": args.threads,
            "clock": clock,
            "layers": args.layers,
            "quick": args.quick,
            "adapters": count,
            "versions": common.versions(),
            "times_s": results,
        },
    )


if __name__ == "__main__":
    main()
