"""Experiment 4: a common rule of thumb tested — all linear layers at low rank vs q/v only at high
rank, for the same number of trainable parameters.

In a MiniLM block (d_model 384, d_ffn 1536) one rank of LoRA costs 768 parameters on each of
query/key/value/attention-output and 1920 on each MLP matrix: all six at r = 4 cost
4 * (4 * 768 + 2 * 1920) = 27,648 per block, exactly q/v at r = 18 (2 * 18 * 768); over the six
blocks both cost 165,888. Same lr (1e-3), alpha
= 2r, steps and seeds as experiment 3; the all-linear r = 4 runs are taken from
results/lora_rank.json. Writes results/placement.json and placement.png.
Run: PYTHONPATH=src python experiments/placement.py   (one process per seed: add --seed 0 / 1 / 2)
"""

from __future__ import annotations

import common
from lora_rank import run, trainable

QV = r"layers\.\d+\..*(query|value)"


def plot(rows: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.analysis.plots import save_figure

    figure, axis = plt.subplots(figsize=(5, 3.5))
    labels = list(rows)
    means = [100 * rows[k]["accuracy"][0] for k in labels]
    stds = [100 * rows[k]["accuracy"][1] for k in labels]
    axis.bar(labels, means, yerr=stds, capsize=4, color=["tab:blue", "tab:orange"])
    for i, row in enumerate(rows.values()):
        for value in row["per_seed"]:
            axis.plot(i, 100 * value, "k.", alpha=0.6)
    low = min(m - s for m, s in zip(means, stds, strict=True))
    axis.set(
        ylim=(max(0, low - 5), 100),
        ylabel="accuracy (%)",
        title="Same budget (165,888 LoRA parameters)",
    )
    save_figure(figure, path)


def main() -> None:
    data: dict = {}

    def run_one(key: str, seed: int) -> dict:
        data.update(data or common.token_data())
        return run(18, seed, data, target=QV)

    qv = common.sweep("placement", ["qv18"], run_one)
    if qv is None:
        return
    earlier = common.wait_for_json("lora_rank.json")  # experiment 3
    all_linear = [r for r in earlier["runs"] if r["rank"] == 4]
    rows = {
        "all linear, r=4": all_linear,
        "q/v only, r=18": qv,
    }
    summary = {
        label: {
            "trainable": trainable(4) if label.startswith("all") else trainable(18, QV),
            "accuracy": common.mean_std([r["accuracy"] for r in runs]),
            "per_seed": [r["accuracy"] for r in runs],
            "final_loss": common.mean_std(
                [r["final_loss"] for r in runs if r.get("final_loss") is not None]
            ),
        }
        for label, runs in rows.items()
    }
    common.write_json("placement.json", {"summary": summary, "qv_runs": qv})
    plot(summary, common.RESULTS / "placement.png")
    for label, row in summary.items():
        print(
            f"{label:<18} {row['trainable']:>8,} {common.fmt(*row['accuracy']):>14} "
            f"loss {row['final_loss'][0]:.3f}"
        )


if __name__ == "__main__":
    main()
