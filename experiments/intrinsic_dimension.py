"""Experiment 5: the intrinsic dimension d90 of a real task, next to the parameter count.

Random-subspace training (Li et al. 2018) with SAID's per-tensor scales (Aghajanyan et al. 2020):
every parameter of the six MiniLM blocks (D = 10.6M numbers, 96 tensors) is
θ_0 + λ_i (P θ_d)_i with P a Fastfood transform; only θ_d and the 96 λ_i train (lr 5e-3, not
tuned), plus the 770-parameter head (lr 1e-2), which trains in every setting. d is swept over
``DIMENSIONS`` for seeds 0, 1, 2 (a SAID step costs ~3.6x a full fine-tuning step on one core:
each seed is ~10 minutes; the subspace seed = the run seed). The frozen-backbone baseline is the head trained alone with the same
loop (experiment 1, results/probe.json). d90 = the smallest d whose mean accuracy reaches 90% of full
fine-tuning's (results/full_finetune.json); also reported against the gain over that baseline,
because on a binary task 90% of the accuracy is close to chance + probe.
Writes results/intrinsic_dimension.json and intrinsic_dimension.png.
Run: PYTHONPATH=src python experiments/intrinsic_dimension.py   (one process per seed: add --seed 0 / 1 / 2)
"""

from __future__ import annotations

import common

from lorakit.analysis.intrinsic import IntrinsicDimension, d90

DIMENSIONS = (100, 1000, 10000, 100000)
SEEDS = (0, 1, 2)
SUBSPACE_LR = 5e-3
HEAD_LR = common.HEAD_LR


def run(dimension: int, seed: int, data: dict) -> dict:
    top = common.fresh_model()
    names = [n for n, p in top.named_parameters() if p.requires_grad and "classifier" not in n]
    wrapper = IntrinsicDimension(top, dimension, names, said=True, seed=seed)
    groups = [
        {"params": [wrapper.theta_d, wrapper.scales], "lr": SUBSPACE_LR},
        {"params": list(top.classifier.parameters()), "lr": HEAD_LR},
    ]
    result = common.train(wrapper, groups, data, lr=SUBSPACE_LR, seed=seed)
    result.update(
        dimension=dimension,
        counted_dimension=wrapper.trainable_dimension,
        projected=wrapper.projection.total,
        seed=seed,
    )
    return result


def plot(summary: dict, full: list, baseline: list, found: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.analysis.plots import save_figure

    figure, axis = plt.subplots(figsize=(6.5, 4))
    dims = list(DIMENSIONS)
    means = [100 * summary[str(d)]["accuracy"][0] for d in dims]
    stds = [100 * summary[str(d)]["accuracy"][1] for d in dims]
    axis.errorbar(dims, means, yerr=stds, marker="o", capsize=3, label="SAID, θ_d only (+ head)")
    axis.axhline(100 * full[0], color="black", label="full fine-tuning")
    axis.axhline(90 * full[0], color="black", linestyle="--", label="90% of full")
    axis.axhspan(
        100 * (baseline[0] - baseline[1]),
        100 * (baseline[0] + baseline[1]),
        color="tab:red",
        alpha=0.2,
        label="head only (frozen backbone)",
    )
    if found["d90"]:
        axis.axvline(found["d90"], color="tab:green", linestyle=":", label=f"d90 = {found['d90']}")
    axis.set(
        xscale="log",
        xlabel="d (subspace dimension)",
        ylabel="accuracy (%)",
        title=f"Intrinsic dimension, D = {summary[str(dims[0])]['projected']:,}",
    )
    axis.legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    data: dict = {}

    def run_one(key: str, seed: int) -> dict:
        data.update(data or common.token_data())
        return run(int(key), seed, data)

    keys = [str(d) for d in DIMENSIONS]
    runs = common.sweep("intrinsic_dimension", keys, run_one, {k: SEEDS for k in keys})
    if runs is None:
        return
    for record in runs:
        record["dimension"] = int(record["key"])
    top = common.fresh_model()
    names = [n for n, p in top.named_parameters() if p.requires_grad and "classifier" not in n]
    projected = sum(top.get_parameter(n).numel() for n in names)
    full = common.full_finetune_results()["accuracy"]
    summary = {
        str(d): {
            "accuracy": common.mean_std([r["accuracy"] for r in runs if r["dimension"] == d]),
            "counted_dimension": d + len(names) if d else 0,
            "projected": projected if d else 0,
        }
        for d in DIMENSIONS
    }
    probes = common.wait_for_json("probe.json")
    # the head trained like every other setting; the converged probe in older results
    baseline = probes.get("head_100_steps_accuracy", probes["accuracy"])
    means = {d: summary[str(d)]["accuracy"][0] for d in DIMENSIONS}
    gains = {d: m - baseline[0] for d, m in means.items()}
    found = {
        "d90": d90(means, full[0]),
        # undefined when full fine-tuning does not beat the probe
        "d90_of_gain_over_head_only": d90(gains, full[0] - baseline[0])
        if full[0] > baseline[0]
        else None,
    }
    common.write_json(
        "intrinsic_dimension.json",
        {
            "setup": {
                "subspace_lr": SUBSPACE_LR,
                "head_lr": HEAD_LR,
                "steps": common.STEPS,
                "batch": common.BATCH,
                "seeds": list(SEEDS),
                "said": True,
                "projected_parameters": summary[str(DIMENSIONS[0])]["projected"],
            },
            "full_finetune_accuracy": full,
            "probe_accuracy": baseline,
            "summary": summary,
            **found,
            "runs": runs,
        },
    )
    plot(summary, full, baseline, found, common.RESULTS / "intrinsic_dimension.png")
    print(f"{'d':>6} {'counted d':>10} {'accuracy %':>14}")
    print(f"{'probe':>6} {0:>10} {common.fmt(*baseline):>14}")
    for d in DIMENSIONS:
        row = summary[str(d)]
        print(f"{d:>6} {row['counted_dimension']:>10} {common.fmt(*row['accuracy']):>14}")
    print(
        f"full fine-tuning {common.fmt(*full)} %; d90 = {found['d90']}; "
        f"d90 of the gain over head-only = {found['d90_of_gain_over_head_only']}"
    )


if __name__ == "__main__":
    main()
