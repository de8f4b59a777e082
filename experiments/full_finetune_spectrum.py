"""Experiment 2: how low is the rank of a FULL fine-tune's update ΔW = W_ft - W0?

Fully fine-tunes all six MiniLM blocks (see common.py) on Rotten Tomatoes for 3 seeds, then
measures every linear layer's ΔW (36 of them), summarised per module type: rank at 90/99% energy, entropy effective rank, stable rank;
the same measures for a Gaussian random matrix of each shape (the "no structure" reference);
and (seed 0) the accuracy of LoRA adapters EXTRACTED from the fine-tune by truncated SVD at
r = 1..64.
Writes results/full_finetune.json, full_finetune_spectra.png, full_finetune_ranks.png.
Run: PYTHONPATH=src python experiments/full_finetune_spectrum.py   (one process per seed: add --seed 0 / 1 / 2)
"""

from __future__ import annotations

import copy

import common
import torch

from lorakit.analysis import (
    Spectrum,
    apply_extraction,
    extract_lora,
    spectrum_of_matrix,
    update_spectra,
)
from lorakit.analysis.plots import plot_effective_ranks, plot_spectra, save_figure

LR = 1e-4
EXTRACT_RANKS = (1, 4, 16, 64)


def run_seed(seed: int, data: dict) -> dict:
    top = common.fresh_model()
    initial = copy.deepcopy(top)
    body = [p for p in top.parameters() if p.requires_grad]  # embeddings stay frozen
    groups = common.with_head(top, body, LR)
    result = common.train(top, groups, data, lr=LR, seed=seed)
    spectra = update_spectra(initial, top)
    # Layers whose base changed outside linear weights (norms, biases, pooler) stay fine-tuned in
    # the "extracted" models below: only the linear weights are replaced by base + s B A.
    extracted = {}
    for rank in EXTRACT_RANKS if seed == 0 else ():  # seed 0 only, to fit the CPU budget
        model = copy.deepcopy(initial).eval()
        extraction = extract_lora(initial, top, rank=rank, exclude=["classifier"])
        with torch.no_grad():
            for name, parameter in top.named_parameters():
                module = name.rsplit(".", 1)[0]
                if not (name.endswith(".weight") and module in dict(extraction.factors)):
                    model.get_parameter(name).copy_(parameter)
        model = apply_extraction(model, extraction)
        extracted[str(rank)] = {
            "accuracy": common.accuracy(model, data),
            "max_relative_error": extraction.relative_error,
            "parameters": extraction.parameters,
        }
    result.update(
        seed=seed,
        layers=[s.to_dict() for s in spectra],
        extracted=extracted,
        trainable=common.count(body),
    )
    return result


def random_reference(spectra: list) -> dict:
    """The same measures for i.i.d. Gaussian matrices of the same shapes."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for s in spectra:
        if s.module_type in out:
            continue
        noise = torch.randn(*s.shape, generator=generator, dtype=torch.float64)
        row = spectrum_of_matrix(s.name, noise).to_dict(max_values=1)
        out[s.module_type] = {
            k: row[k] for k in ("rank_90", "rank_99", "entropy_rank", "stable_rank")
        }
    return out


def plot_ranks(
    summary: dict,
    reference: dict,
    path,
    title: str = "Full fine-tune of MiniLM-L6: effective rank of ΔW (mean over 6 layers x seeds)",
    wrap_names: bool = True,
) -> None:
    """Bars of mean ± sd r @ 90% / r @ 99% / entropy rank per module type (``summary[type][key]
    = (mean, sd)``), Gaussian noise's r @ 90% marked; ``wrap_names`` breaks the tick labels at
    the dots of the module names."""
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
    axis.set_xticks(
        range(len(types)),
        [
            f"{t.replace('.', chr(10)) if wrap_names else t}\n(max {summary[t]['max_rank']})"
            for t in types
        ],
        fontsize=7,
    )
    axis.set(ylabel="rank", yscale="log", title=title)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def summary_blocks(by_layer: dict[str, list]) -> dict[str, tuple[float, float]]:
    return {block: common.mean_std(values) for block, values in by_layer.items()}


def main() -> None:
    data: dict = {}

    def run_one(key: str, seed: int) -> dict:
        data.update(data or common.token_data())
        return run_seed(seed, data)

    runs = common.sweep("full_finetune", ["full"], run_one)
    if runs is None:
        return
    runs.sort(key=lambda r: r["seed"])
    # the new head is not a pretrained weight: its "update" is left out of the summaries
    kept = [i for i, row in enumerate(runs[0]["layers"]) if "classifier" not in row["name"]]
    first_spectra = [
        Spectrum(
            row["name"],
            tuple(row["shape"]),
            torch.tensor(row["singular_values"], dtype=torch.float64),
            row["max_rank"],
        )
        for row in (runs[0]["layers"][i] for i in kept)
    ]
    summary = {}  # per module type: mean ± sd over the six layers and the seeds
    by_layer: dict[str, list] = {}  # per block: r @ 90% of its six matrices, all seeds
    for index, spectrum in zip(kept, first_spectra, strict=True):
        rows = [run["layers"][index] for run in runs]
        by_layer.setdefault(str(spectrum.layer_index), []).extend(r["rank_90"] for r in rows)
        entry = summary.setdefault(
            spectrum.module_type,
            {"shape": list(spectrum.shape), "max_rank": spectrum.max_rank, "rows": []},
        )
        entry["rows"] += rows
    for entry in summary.values():
        rows = entry.pop("rows")
        entry["count"] = len(rows)
        for key in ("rank_90", "rank_99", "entropy_rank", "stable_rank"):
            entry[key] = common.mean_std([r[key] for r in rows])
    reference = random_reference(first_spectra)
    accuracy = common.mean_std([r["accuracy"] for r in runs])
    extracted = {  # seed 0 only
        rank: common.mean_std([runs[0]["extracted"][rank]["accuracy"]])
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
                "scope": "MiniLM-L6, all 6 blocks + new head on mean pooling; embeddings frozen",
            },
            "accuracy": accuracy,
            "summary_by_module": summary,
            "rank_90_by_block": summary_blocks(by_layer),
            "gaussian_reference": reference,
            "extracted_accuracy": extracted,
            "runs": [  # the first 64 singular values per layer (all are in the .runs.jsonl)
                {
                    **r,
                    "layers": [
                        {**row, "singular_values": row["singular_values"][:64]}
                        for row in r["layers"]
                    ],
                }
                for r in runs
            ],
        },
    )
    plot_spectra(
        first_spectra,
        common.RESULTS / "full_finetune_spectra.png",
        title="ΔW of a full fine-tune (MiniLM-L6, 36 layers, seed 0)",
    )
    plot_ranks(summary, reference, common.RESULTS / "full_finetune_ranks.png")
    plot_effective_ranks(
        first_spectra,
        common.RESULTS / "full_finetune_layers.png",
        title="Effective rank of ΔW by block (full fine-tune, seed 0)",
    )
    print(f"full fine-tune accuracy {common.fmt(*accuracy)} %")
    print(f"{'module':<28} {'shape':>9} {'r90':>12} {'r99':>12} {'erank':>14} {'noise r90':>10}")
    for key, row in summary.items():
        print(
            f"{key:<28} {'x'.join(map(str, row['shape'])):>9} "
            f"{row['rank_90'][0]:>6.1f}±{row['rank_90'][1]:<5.1f} {row['rank_99'][0]:>6.1f}±{row['rank_99'][1]:<5.1f}"
            f"{row['entropy_rank'][0]:>8.1f}±{row['entropy_rank'][1]:<5.1f} {reference[key]['rank_90']:>10}"
        )
    for block, (mean, std) in summary_blocks(by_layer).items():
        print(f"block {block}: r @ 90% = {mean:.1f} ± {std:.1f} (six matrices x seeds)")
    for rank, (mean, std) in extracted.items():
        print(f"extracted r={rank}: accuracy {common.fmt(mean, std)} %")


if __name__ == "__main__":
    main()
