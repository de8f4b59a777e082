"""Print the markdown tables of docs/low-rank.md from experiments/results/*.json.

Run: python experiments/tables.py   (instant; after the experiments)
"""

from __future__ import annotations

import json

import common


def load(name: str) -> dict | None:
    path = common.RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def pct(pair) -> str:
    return common.fmt(*pair)


def full_finetune(data: dict) -> None:
    print(f"Full fine-tuning accuracy: {pct(data['accuracy'])} %\n")
    print(
        "| module | shape (d x k) | r @ 90% | r @ 99% | entropy rank | stable rank | noise r @ 90% |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, row in data["summary_by_module"].items():
        noise = data["gaussian_reference"][key]
        shape = " x ".join(map(str, row["shape"]))
        cells = [
            f"{row[k][0]:.1f} ± {row[k][1]:.1f}"
            for k in ("rank_90", "rank_99", "entropy_rank", "stable_rank")
        ]
        print(f"| {key} | {shape} | " + " | ".join(cells) + f" | {noise['rank_90']} |")
    print("\n| adapter extracted from the full fine-tune (seed 0) | parameters | accuracy % |")
    print("|---|---|---|")
    for rank, pair in data["extracted_accuracy"].items():
        parameters = data["runs"][0]["extracted"][rank]["parameters"]
        print(f"| r = {rank} | {parameters:,} | {pct(pair)} |")
    print()


def probe(data: dict) -> None:
    print(f"Linear probe: {pct(data['accuracy'])} % (train {pct(data['train_accuracy'])} %)")
    if "tuned_accuracy" in data:
        print(f"Best of the grid, chosen on eval: {pct(data['tuned_accuracy'])} %")
    if "head_100_steps_accuracy" in data:
        print(f"Head only, 100 steps like the others: {pct(data['head_100_steps_accuracy'])} %")
    print()


def lora_rank(data: dict) -> None:
    print("| setting | trainable parameters | accuracy % | per seed |")
    print("|---|---|---|---|")
    for rank, row in data["summary"].items():
        seeds = ", ".join(
            f"{100 * r['accuracy']:.1f}" for r in data["runs"] if r["rank"] == int(rank)
        )
        print(f"| LoRA r = {rank} | {row['trainable']:,} | {pct(row['accuracy'])} | {seeds} |")
    full = data["full_finetune"]
    print(f"| full fine-tuning | {full['trainable']:,} | {pct(full['accuracy'])} | |\n")


def placement(data: dict) -> None:
    print("| setting | trainable parameters | accuracy % | per seed | final loss |")
    print("|---|---|---|---|---|")
    for label, row in data["summary"].items():
        seeds = ", ".join(f"{100 * a:.1f}" for a in row["per_seed"])
        loss = f"{row['final_loss'][0]:.3f} ± {row['final_loss'][1]:.3f}"
        print(f"| {label} | {row['trainable']:,} | {pct(row['accuracy'])} | {seeds} | {loss} |")
    print()


def intrinsic(data: dict) -> None:
    print(f"D = {data['setup']['projected_parameters']:,} parameters in the subspace.\n")
    print("| d | d counted (θ_d + λ) | accuracy % | per seed |")
    print("|---|---|---|---|")
    print(f"| head only (frozen backbone) | 0 | {pct(data['probe_accuracy'])} | |")
    for d, row in data["summary"].items():
        seeds = ", ".join(
            f"{100 * r['accuracy']:.1f}" for r in data["runs"] if r["dimension"] == int(d)
        )
        print(f"| {d} | {row['counted_dimension']:,} | {pct(row['accuracy'])} | {seeds} |")
    print(
        f"| full fine-tuning | {data['setup']['projected_parameters']:,} | "
        f"{pct(data['full_finetune_accuracy'])} |"
    )
    print(
        f"\nd90 = {data['d90']}; d90 of the gain over head-only = "
        f"{data['d90_of_gain_over_head_only']}\n"
    )


def smollm2(data: dict) -> None:
    from smollm2_report import markdown

    setup = data["setup"]
    print(
        f"{setup['steps']} steps x {setup['batch']} reviews, max {setup['max_length']} tokens, "
        f"{setup['eval_size']} test reviews, lr {setup['full_lr']} full / {setup['lora_lr']} LoRA\n"
    )
    fields = ("summary", "summary_by_module", "rank_90_by_blocks", "rank_advice_90")
    print(markdown(*(data[f] for f in fields), data["gaussian_reference"]) + "\n")


def main() -> None:
    for name, render in [
        ("probe.json", probe),
        ("full_finetune.json", full_finetune),
        ("lora_rank.json", lora_rank),
        ("placement.json", placement),
        ("intrinsic_dimension.json", intrinsic),
        ("smollm2.json", smollm2),
    ]:
        data = load(name)
        print(f"### {name}\n")
        if data is None:
            print("(not run yet)\n")
        else:
            render(data)


if __name__ == "__main__":
    main()
