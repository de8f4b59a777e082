"""Experiment 2: how low is the rank of a FULL fine-tune's update ΔW = W_ft - W0?

Fully fine-tunes the top MiniLM block (see common.py) on Rotten Tomatoes for 3 seeds, then
measures every linear layer's ΔW: rank at 90/99% energy, entropy effective rank, stable rank;
the same measures for a Gaussian random matrix of each shape (the "no structure" reference);
and the accuracy of LoRA adapters EXTRACTED from the fine-tune by truncated SVD at r = 1..64.
Writes results/full_finetune.json, full_finetune_spectra.png, full_finetune_ranks.png.
Run: PYTHONPATH=src python experiments/full_finetune_spectrum.py   (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import copy

import common
import torch

from lorakit.analysis import apply_extraction, extract_lora, spectrum_of_matrix, update_spectra
from lorakit.analysis.plots import plot_spectra, save_figure

LR = 2e-4
EXTRACT_RANKS = (1, 4, 16, 64)


def run_seed(seed: int, features: dict) -> tuple[dict, list]:
    top = common.fresh_top()
    initial = copy.deepcopy(top)
    groups = common.with_head(top, list(top.parameters()), LR)
    result = common.train(top, groups, features, lr=LR, seed=seed)
    spectra = update_spectra(initial, top)
    # Layers whose base changed outside linear weights (norms, biases, pooler) stay fine-tuned in
    # the "extracted" models below: only the linear weights are replaced by base + s B A.
    extracted = {}
    for rank in EXTRACT_RANKS:
        model = copy.deepcopy(initial).eval()
        extraction = extract_lora(initial, top, rank=rank, exclude=["classifier"])
        with torch.no_grad():
            for name, parameter in top.named_parameters():
                module = name.rsplit(".", 1)[0]
                if not (name.endswith(".weight") and module in dict(extraction.factors)):
                    model.get_parameter(name).copy_(parameter)
        model = apply_extraction(model, extraction)
        extracted[str(rank)] = {
            "accuracy": common.accuracy(model, features),
            "max_relative_error": extraction.relative_error,
            "parameters": extraction.parameters,
        }
    result.update(
        seed=seed,
        layers=[s.to_dict(max_values=64) for s in spectra],
        extracted=extracted,
        trainable=common.count(top.parameters()),
    )
    return result, spectra


def random_reference(spectra: list) -> dict:
    """The same measures for i.i.d. Gaussian matrices of the same shapes."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for s in spectra:
        noise = torch.randn(*s.shape, generator=generator, dtype=torch.float64)
        row = spectrum_of_matrix(s.name, noise).to_dict(max_values=1)
        out[s.module_type] = {
            k: row[k] for k in ("rank_90", "rank_99", "entropy_rank", "stable_rank")
        }
    return out


def plot_ranks(summary: dict, reference: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(summary)
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.2
    for offset, (key, label) in enumerate(
        [
            ("rank_90", "r @ 90% energy"),
            ("rank_99", "r @ 99% energy"),
            ("entropy_rank", "entropy rank"),
        ]
    ):
        means = [summary[t][key][0] for t in types]
        stds = [summary[t][key][1] for t in types]
        positions = [i + (offset - 1) * width for i in range(len(types))]
        axis.bar(positions, means, width, yerr=stds, label=label)
    axis.scatter(
        range(len(types)),
        [reference[t]["rank_90"] for t in types],
        marker="_",
        s=400,
        color="black",
        label="Gaussian noise, r @ 90%",
    )
    axis.set_xticks(range(len(types)), [f"{t}\n(max {summary[t]['max_rank']})" for t in types])
    axis.set(
        ylabel="rank", yscale="log", title="Full fine-tune of MiniLM block 5: effective rank of ΔW"
    )
    axis.legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    features = common.cached_features()
    runs, first_spectra = [], None
    for seed in common.SEEDS:
        result, spectra = run_seed(seed, features)
        runs.append(result)
        first_spectra = first_spectra or spectra
        print(
            f"seed {seed}: accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)",
            flush=True,
        )
    summary = {}
    for layer_index, layer in enumerate(runs[0]["layers"]):
        rows = [run["layers"][layer_index] for run in runs]
        summary[layer["module_type"] if layer["name"].startswith("layers") else layer["name"]] = {
            "name": layer["name"],
            "shape": layer["shape"],
            "max_rank": layer["max_rank"],
            **{
                key: common.mean_std([r[key] for r in rows])
                for key in ("rank_90", "rank_99", "entropy_rank", "stable_rank")
            },
        }
    reference = random_reference(first_spectra)
    reference = {key: reference[value["name"].rsplit(".", 1)[-1]] for key, value in summary.items()}
    accuracy = common.mean_std([r["accuracy"] for r in runs])
    extracted = {
        rank: common.mean_std([r["extracted"][rank]["accuracy"] for r in runs])
        for rank in map(str, EXTRACT_RANKS)
    }
    common.write_json(
        "full_finetune.json",
        {
            "setup": {
                "lr": LR,
                "head_lr": common.HEAD_LR,
                "steps": common.STEPS,
                "batch": common.BATCH,
                "seeds": list(common.SEEDS),
                "scope": "MiniLM-L6 block 5 + new head on mean pooling; layers 0-4 frozen",
            },
            "accuracy": accuracy,
            "summary_by_module": summary,
            "gaussian_reference": reference,
            "extracted_accuracy": extracted,
            "runs": runs,
        },
    )
    plot_spectra(
        first_spectra,
        common.RESULTS / "full_finetune_spectra.png",
        title="ΔW of a full fine-tune (MiniLM block 5, seed 0)",
    )
    plot_ranks(summary, reference, common.RESULTS / "full_finetune_ranks.png")
    print(f"full fine-tune accuracy {common.fmt(*accuracy)} %")
    print(f"{'module':<28} {'shape':>9} {'r90':>12} {'r99':>12} {'erank':>14} {'noise r90':>10}")
    for key, row in summary.items():
        print(
            f"{key:<28} {'x'.join(map(str, row['shape'])):>9} "
            f"{row['rank_90'][0]:>6.1f}±{row['rank_90'][1]:<5.1f} {row['rank_99'][0]:>6.1f}±{row['rank_99'][1]:<5.1f}"
            f"{row['entropy_rank'][0]:>8.1f}±{row['entropy_rank'][1]:<5.1f} {reference[key]['rank_90']:>10}"
        )
    for rank, (mean, std) in extracted.items():
        print(f"extracted r={rank}: accuracy {common.fmt(mean, std)} %")


if __name__ == "__main__":
    main()
