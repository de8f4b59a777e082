"""What dropout costs the fused LoRA training step, measured inside one process: the same
adapters (all-linear r=16) with lora_dropout 0.05 and 0, and the frozen-base step, alternating.
A ratio between two LoRA steps is much steadier than a ratio to the frozen step, whose own time
moves by up to 10% between rounds on a shared VM.

    python benchmarks/bench_dropout_cost.py [--quick] [--threads 1] [--layers 8] [--repeats 7]
"""

from __future__ import annotations

import copy

import common
import torch


def lora_step(base, dropout: float, ids: torch.Tensor):
    """A training step (forward, backward, AdamW) of a copy of ``base`` with non-zero adapters."""
    import lorakit

    config = lorakit.LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules="all-linear",
        init_lora_weights=False,
    )
    model = lorakit.inject(copy.deepcopy(base), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], "dropout_cost").parse_args()
    torch.set_num_threads(args.threads)
    clock = common.set_clock(args.clock, args.threads)
    config = common.smollm2_config(args.layers, args.quick)
    base = common.base_model(config)
    batch, length = (2, 16) if args.quick else (4, 128)
    ids = torch.randint(
        0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    )

    def frozen() -> None:
        embeds = base.get_input_embeddings()(ids).detach().requires_grad_()
        base(inputs_embeds=embeds, labels=ids).loss.backward()

    times = common.alternate(
        {
            "frozen": frozen,
            "dropout 0": lora_step(base, 0.0, ids),
            "dropout 0.05": lora_step(base, 0.05, ids),
        },
        args.repeats,
    )
    medians = {name: common.median(values) for name, values in times.items()}
    rows = [
        (
            name,
            f"{seconds:.3f}",
            f"{seconds / medians['frozen']:.3f}",
            f"{seconds / medians['dropout 0']:.3f}",
        )
        for name, seconds in medians.items()
    ]
    print(common.table(rows, ("step", "seconds", "/ frozen", "/ dropout 0")))
    common.write_json(
        args.out,
        {
            "workload": "dropout cost of the fused training step",
            "threads": args.threads,
            "clock": clock,
            "layers": args.layers,
            "quick": args.quick,
            "batch": [batch, length],
            "versions": common.versions(),
            "times_s": times,
        },
    )


if __name__ == "__main__":
    main()
