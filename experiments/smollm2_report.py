"""Summary, JSON, plots and markdown tables of experiments/smollm2_rank.py.

``report(runs)`` is called by smollm2_rank.py once every run is in results/smollm2.runs.jsonl;
``python experiments/smollm2_report.py`` redoes it from the JSONL (instant).
"""

from __future__ import annotations

import json

import common
import smollm2_settings as settings
import torch
from full_finetune_spectrum import plot_ranks, random_reference

from lorakit.analysis import Spectrum
from lorakit.analysis.plots import plot_effective_ranks, plot_spectra, save_figure

LABELS = {
    "zero_shot": "zero-shot (no training)",
    "r1": "LoRA all 7 projections, r = 1",
    "r4": "LoRA all 7 projections, r = 4",
    "r16": "LoRA all 7 projections, r = 16",
    "qv_r21": "LoRA q_proj + v_proj, r = 21",
    "full": "full fine-tuning (30 blocks)",
}
MEASURES = ("rank_90", "rank_99", "entropy_rank", "stable_rank")


def spectra_of(run: dict) -> list[Spectrum]:
    return [
        Spectrum(
            row["name"],
            tuple(row["shape"]),
            torch.tensor(row["singular_values"], dtype=torch.float64),
            row["max_rank"],
        )
        for row in run["layers"]
    ]


def accuracy_summary(runs: list[dict]) -> dict:
    """Per setting: accuracy mean ± sd, per seed, trainable count, final loss, share of gain."""
    by_key: dict[str, list[dict]] = {}
    for record in sorted(runs, key=lambda r: r["seed"]):
        by_key.setdefault(record["key"], []).append(record)
    zero = by_key["zero_shot"][0]["accuracy"]
    full = common.mean_std([r["accuracy"] for r in by_key["full"]])[0]
    summary = {}
    for key in LABELS:
        rows = by_key[key]
        accuracy = common.mean_std([r["accuracy"] for r in rows])
        summary[key] = {
            "label": LABELS[key],
            "accuracy": accuracy,
            "per_seed": [r["accuracy"] for r in rows],
            "trainable": rows[0].get("trainable", 0),
            "final_loss": common.mean_std([r["final_loss"] for r in rows if "final_loss" in r]),
            "train_seconds": common.mean_std([r["seconds"] for r in rows]),
            "share_of_gain": (accuracy[0] - zero) / (full - zero) if full > zero else None,
        }
    return summary


def spectrum_summary(full_runs: list[dict]) -> tuple[dict, dict, dict]:
    """Per module type (mean ± sd over 30 blocks x seeds), per block third, rank advice."""
    by_type: dict[str, dict] = {}
    by_third: dict[str, list[float]] = {}
    for run in full_runs:
        for row in run["layers"]:
            spectrum = spectra_of({"layers": [row]})[0]
            entry = by_type.setdefault(
                spectrum.module_type,
                {"shape": row["shape"], "max_rank": row["max_rank"], "rows": []},
            )
            entry["rows"].append(row)
            third = f"blocks {10 * (row['layer'] // 10)}-{10 * (row['layer'] // 10) + 9}"
            by_third.setdefault(third, []).append(row["rank_90"])
    for entry in by_type.values():
        rows = entry.pop("rows")
        entry["count"] = len(rows)
        for key in MEASURES:
            entry[key] = common.mean_std([r[key] for r in rows])
    advice: dict[str, list[int]] = {}
    for run in full_runs:
        for item in run["rank_advice_90"]:
            advice.setdefault(item["module_type"], []).append(item["rank"])
    thirds = {k: common.mean_std(v) for k, v in by_third.items()}
    return by_type, thirds, advice


def plot_accuracy(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    ranks = ["r1", "r4", "r16"]
    xs = [summary[k]["trainable"] for k in ranks]
    axis.errorbar(
        xs,
        [100 * summary[k]["accuracy"][0] for k in ranks],
        yerr=[100 * summary[k]["accuracy"][1] for k in ranks],
        marker="o",
        capsize=3,
        label="LoRA, all 7 projections (r = 1, 4, 16)",
    )
    for key, marker in (("qv_r21", "s"), ("full", "D")):
        row = summary[key]
        axis.errorbar(
            [row["trainable"]],
            [100 * row["accuracy"][0]],
            yerr=[100 * row["accuracy"][1]],
            marker=marker,
            capsize=3,
            linestyle="none",
            label=row["label"],
        )
    axis.axhline(100 * summary["zero_shot"]["accuracy"][0], color="tab:red", linestyle="--")
    axis.annotate("zero-shot", (xs[0], 100 * summary["zero_shot"]["accuracy"][0] + 0.4))
    axis.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="accuracy on 200 held-out test reviews (%)",
        title="SmolLM2-135M-Instruct, Rotten Tomatoes (mean ± sd, 3 seeds)",
    )
    axis.legend(fontsize=8, loc="lower right")
    save_figure(figure, path)


def markdown(summary: dict, by_type: dict, thirds: dict, advice: dict, reference: dict) -> str:
    """The tables of docs/low-rank.md's SmolLM2 section."""
    lines = [
        "| setting | trainable parameters | accuracy % | per seed (0, 1, 2) | final loss | "
        "share of the gain |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary.values():
        seeds = ", ".join(f"{100 * a:.1f}" for a in row["per_seed"])
        loss = row["final_loss"]
        share = row["share_of_gain"]
        lines.append(
            f"| {row['label']} | {row['trainable']:,} | {common.fmt(*row['accuracy'])} | {seeds} "
            f"| {'-' if loss[0] != loss[0] else f'{loss[0]:.3f} ± {loss[1]:.3f}'} "
            f"| {'-' if share is None else f'{100 * share:.0f}%'} |"
        )
    lines += [
        "",
        "| module | shape (d x k) | r @ 90% | r @ 99% | entropy rank | stable rank | "
        "noise r @ 90% | advised r (90%, per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in by_type.items():
        cells = [f"{row[m][0]:.1f} ± {row[m][1]:.1f}" for m in MEASURES]
        lines.append(
            f"| {key} | {' x '.join(map(str, row['shape']))} | "
            + " | ".join(cells)
            + f" | {reference[key]['rank_90']} | {', '.join(map(str, advice[key]))} |"
        )
    lines += ["", "| blocks | " + " | ".join(thirds) + " |", "|---" * (len(thirds) + 1) + "|"]
    lines.append(
        "| r @ 90% | " + " | ".join(f"{m:.0f} ± {s:.0f}" for m, s in thirds.values()) + " |"
    )
    return "\n".join(lines)


def report(runs: list[dict]) -> None:
    summary = accuracy_summary(runs)
    full_runs = sorted([r for r in runs if r["key"] == "full"], key=lambda r: r["seed"])
    by_type, thirds, advice = spectrum_summary(full_runs)
    first = spectra_of(full_runs[0])
    reference = random_reference(first)
    common.write_json(
        "smollm2.json",
        {
            "setup": {
                "model": settings.MODEL,
                "steps": settings.STEPS,
                "batch": settings.BATCH,
                "max_length": settings.MAX_LENGTH,
                "eval_size": settings.EVAL_SIZE,
                "full_lr": settings.FULL_LR,
                "lora_lr": settings.LORA_LR,
                "alpha": "2r",
                "seeds": list(common.SEEDS),
            },
            "summary": summary,
            "summary_by_module": by_type,
            "rank_90_by_blocks": thirds,
            "rank_advice_90": advice,
            "gaussian_reference": reference,
            "runs": [  # the first 64 singular values per layer (all are in the .runs.jsonl)
                {
                    **r,
                    "layers": [
                        {**row, "singular_values": row["singular_values"][:64]}
                        for row in r.get("layers", [])
                    ],
                }
                for r in runs
            ],
        },
    )
    plot_accuracy(summary, common.RESULTS / "smollm2_accuracy.png")
    plot_ranks(
        by_type,
        reference,
        common.RESULTS / "smollm2_ranks.png",
        title="Full fine-tune of SmolLM2-135M: effective rank of ΔW (30 blocks x 3 seeds)",
        wrap_names=False,
    )
    title = "ΔW of a full fine-tune (SmolLM2-135M, 210 layers, seed 0)"
    plot_spectra(first, common.RESULTS / "smollm2_spectra.png", title=title)
    plot_effective_ranks(
        first, common.RESULTS / "smollm2_layers.png", title="r @ 90% by block (seed 0)"
    )
    print(markdown(summary, by_type, thirds, advice, reference))


def main() -> None:
    path = common.RESULTS / "smollm2.runs.jsonl"
    report([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
