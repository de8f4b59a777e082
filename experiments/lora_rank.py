"""Experiment 3: LoRA at r = 1, 4, 16, 64 against full fine-tuning, same task, steps and batch.

Adapters on every linear layer of all six MiniLM blocks (query, key, value, attention output,
intermediate, output: 36 layers), lora_alpha = 2r, lr 1e-3, the head trained in full (lr 1e-2).
Full fine-tuning numbers come from results/full_finetune.json (experiment 2, lr 1e-4).
Writes results/lora_rank.json and lora_rank.png.
Run: PYTHONPATH=src python experiments/lora_rank.py   (one process per seed: add --seed 0 / 1 / 2)
"""

from __future__ import annotations

import common

import lorakit

RANKS = (1, 4, 16, 64)
LR = 1e-3
ALL_LINEAR = r"layers\.\d+\..*(query|key|value|dense)"


def run(rank: int, seed: int, data: dict, target=ALL_LINEAR) -> dict:
    config = lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target)
    top, parameters = common.lora_model(config)
    groups = common.with_head(top, parameters, LR)
    result = common.train(top, groups, data, lr=LR, seed=seed)
    result.update(seed=seed, rank=rank, trainable=common.count(parameters))
    return result


def plot(summary: dict, full: list, probe: list, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.analysis.plots import save_figure

    figure, axis = plt.subplots(figsize=(6, 4))
    params = [summary[str(r)]["trainable"] for r in RANKS]
    means = [100 * summary[str(r)]["accuracy"][0] for r in RANKS]
    stds = [100 * summary[str(r)]["accuracy"][1] for r in RANKS]
    axis.errorbar(params, means, yerr=stds, marker="o", capsize=3, label="LoRA r = 1, 4, 16, 64")
    for r, x, y in zip(RANKS, params, means, strict=True):
        axis.annotate(f"r={r}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    axis.axhspan(
        100 * (full[0] - full[1]),
        100 * (full[0] + full[1]),
        color="grey",
        alpha=0.3,
        label="full fine-tuning (mean ± sd)",
    )
    axis.axhline(100 * probe[0], color="tab:red", linestyle="--", label="head only (frozen)")
    axis.set(
        xscale="log",
        xlabel="trainable parameters (incl. 770 of the head)",
        ylabel=f"accuracy on {common.EVAL_SIZE} held-out reviews (%)",
        title="LoRA rank vs full fine-tuning (MiniLM-L6, all 6 blocks)",
    )
    axis.legend(fontsize=8)
    save_figure(figure, path)


def trainable(rank: int, target=ALL_LINEAR) -> int:
    config = lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target)
    return common.count(common.lora_model(config)[1])


def main() -> None:
    data: dict = {}

    def run_one(key: str, seed: int) -> dict:
        data.update(data or common.token_data())
        return run(int(key), seed, data)

    runs = common.sweep("lora_rank", [str(r) for r in RANKS], run_one)
    if runs is None:
        return
    for record in runs:
        record["rank"] = int(record["key"])
    full = common.full_finetune_results()
    summary = {
        str(rank): {
            "trainable": trainable(rank),
            "accuracy": common.mean_std([r["accuracy"] for r in runs if r["rank"] == rank]),
        }
        for rank in RANKS
    }
    full_accuracy = full["accuracy"]
    full_trainable = full["runs"][0]["trainable"]
    common.write_json(
        "lora_rank.json",
        {
            "setup": {
                "lr": LR,
                "alpha": "2r",
                "target_modules": ALL_LINEAR,
                "steps": common.STEPS,
                "batch": common.BATCH,
                "seeds": list(common.SEEDS),
            },
            "summary": summary,
            "full_finetune": {"accuracy": full_accuracy, "trainable": full_trainable},
            "runs": runs,
        },
    )
    probe = common.wait_for_json("probe.json").get("head_100_steps_accuracy")
    plot(summary, full_accuracy, probe, common.RESULTS / "lora_rank.png")
    print(f"{'setting':<16} {'trainable':>10} {'accuracy %':>14}")
    for rank in RANKS:
        row = summary[str(rank)]
        print(f"LoRA r={rank:<10} {row['trainable']:>10,} {common.fmt(*row['accuracy']):>14}")
    print(f"{'full':<16} {full_trainable:>10,} {common.fmt(*full_accuracy):>14}")


if __name__ == "__main__":
    main()
