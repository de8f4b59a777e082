"""Workload 5: merge exactness. max |W - W0| of a 512 x 512 base weight after 1 and 100
merge/unmerge cycles, in fp32, bf16 and fp16 (fp32 adapters on the half-precision bases, as both
libraries create them by default), lorakit beside PEFT with identical non-zero adapters.

    python benchmarks/bench_merge.py [--quick]
"""

from __future__ import annotations

import copy

import common
import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pair(dtype: torch.dtype, size: int):
    import peft

    import lorakit

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(size, size)).to(dtype)
    fields = dict(r=16, lora_alpha=32, target_modules=["0"])
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    generator = torch.Generator().manual_seed(1)
    state = {}
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if "lora_" in key:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.05)
                state["base_model.model." + key] = value
    theirs.load_state_dict(state, strict=False)
    return base[0].weight.detach().clone(), ours, theirs


def cycles(original, merge, unmerge, weight, counts=(1, 100)) -> dict[str, float]:
    errors, done = {}, 0
    for count in counts:
        for _ in range(count - done):
            merge()
            unmerge()
        done = count
        errors[str(count)] = (weight().float() - original.float()).abs().max().item()
    return errors


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], "merge").parse_args()
    torch.set_num_threads(args.threads)
    import lorakit

    size = 64 if args.quick else 512
    results = {}
    for label, dtype in DTYPES.items():
        original, ours, theirs = pair(dtype, size)
        results[label] = {
            "lorakit": cycles(
                original,
                lambda m=ours: lorakit.merge(m),
                lambda m=ours: lorakit.unmerge(m),
                lambda m=ours: m[0].weight,
            ),
            "peft": cycles(
                original,
                theirs.merge_adapter,
                theirs.unmerge_adapter,
                lambda m=theirs: m.base_model.model[0].weight,
            ),
        }
    rows = [
        (label, *(f"{r[lib][n]:.3g}" for lib in ("lorakit", "peft") for n in ("1", "100")))
        for label, r in results.items()
    ]
    print(common.table(rows, ("dtype", "lorakit 1", "lorakit 100", "peft 1", "peft 100")))
    common.write_json(
        args.out,
        {
            "workload": "merge exactness",
            "size": size,
            "quick": args.quick,
            "versions": common.versions(),
            "max_abs_error": results,
        },
    )


if __name__ == "__main__":
    main()
