"""Experiment 3, follow-up: is LoRA r = 64's collapse an optimisation artefact?

With lora_alpha = 2r the scale s = alpha / r = 2 at every rank, so at the shared lr 1e-3 the
r = 64 adapter moves the weights the most and one seed diverged. Here r = 64 runs again at
lr 2.5e-4: under Adam (steps ~ lr, ΔW = s B A) this is close to keeping alpha = 32 fixed
(s = 0.5) at lr 1e-3, the LoRA paper's convention of a fixed alpha. Same seeds, steps, data.
Writes results/lora_r64_lower_lr.json.
Run: PYTHONPATH=src python experiments/lora_r64_lower_lr.py
"""

from __future__ import annotations

import common
from lora_rank import ALL_LINEAR

import lorakit

LR = 2.5e-4


def run(seed: int, data: dict) -> dict:
    config = lorakit.LoraConfig(r=64, lora_alpha=128, target_modules=ALL_LINEAR)
    model, parameters = common.lora_model(config)
    groups = common.with_head(model, parameters, LR)
    result = common.train(model, groups, data, lr=LR, seed=seed)
    result.update(seed=seed, rank=64, lr=LR, trainable=common.count(parameters))
    return result


def main() -> None:
    data: dict = {}

    def run_one(key: str, seed: int) -> dict:
        data.update(data or common.token_data())
        return run(seed, data)

    runs = common.sweep("lora_r64_lower_lr", ["64"], run_one)
    if runs is None:
        return
    accuracy = common.mean_std([r["accuracy"] for r in runs])
    common.write_json(
        "lora_r64_lower_lr.json",
        {
            "setup": {"rank": 64, "alpha": 128, "lr": LR, "steps": common.STEPS},
            "accuracy": accuracy,
            "final_loss": common.mean_std([r["final_loss"] for r in runs]),
            "runs": runs,
        },
    )
    print(f"LoRA r=64 at lr {LR}: {common.fmt(*accuracy)} %")


if __name__ == "__main__":
    main()
