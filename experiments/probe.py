"""Experiment 1: the frozen-backbone baseline — a linear probe on MiniLM's mean-pooled embedding.

The 384-number sentence embedding of every review is computed once with the pretrained model
(eval mode), then only the 2-way head (770 parameters) trains, to convergence: full-batch AdamW,
lr 1e-2, ``PROBE_STEPS`` steps, from the seed's own head initialisation. Every fine-tuning
setting has to beat this number to show that adapting the backbone matters. Because that probe
over-fits (train accuracy ~86%), a "tuned" probe also picks the best of a small grid (steps x L2
penalty) ON THE EVAL SET — an optimistic number, i.e. a baseline biased in the probe's favour.
A third baseline, "head, 100 steps", trains only the head exactly like every other setting
(``common.train``: same steps, batches, dropout in the frozen backbone, lr 1e-2).
Writes results/probe.json.
Run: PYTHONPATH=src python experiments/probe.py
"""

from __future__ import annotations

import common
import torch
from torch import nn

PROBE_STEPS = 2000
GRID = [(steps, l2) for steps in (100, 300, 1000, 2000) for l2 in (0.0, 1e-3, 1e-2)]


@torch.no_grad()
def embeddings(model: common.Classifier, data: dict) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("eval", "train"):
        ids, mask, labels = common.split(data, part)
        pooled = torch.empty(len(labels), 384)
        for index in common.batches(mask, 100, None):
            pooled[index] = model.pool(*common.trimmed(ids[index], mask[index]))
        out[part] = pooled
        out[part + "_labels"] = labels
    return out


def run(seed: int, pooled: dict, steps: int = PROBE_STEPS, l2: float = 0.0) -> dict:
    """Logistic regression on the pooled embeddings: cross-entropy + l2 * ||W||^2."""
    torch.manual_seed(seed)
    head = nn.Linear(384, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=common.HEAD_LR, weight_decay=0.0)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(pooled["train"]), pooled["train_labels"])
        loss = loss + l2 * head.weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        correct = (head(pooled["eval"]).argmax(-1) == pooled["eval_labels"]).float().mean()
        train_acc = (head(pooled["train"]).argmax(-1) == pooled["train_labels"]).float().mean()
    return {
        "accuracy": float(correct),
        "train_accuracy": float(train_acc),
        "final_loss": float(loss.detach()),
        "seconds": 0.0,
        "steps": steps,
        "l2": l2,
    }


def run_tuned(seed: int, pooled: dict) -> dict:
    """The best of ``GRID`` by eval accuracy (optimistic by construction)."""
    return max((run(seed, pooled, steps, l2) for steps, l2 in GRID), key=lambda r: r["accuracy"])


def head_only(seed: int, data: dict) -> dict:
    """Only the head trains, through the frozen model, with the shared training loop."""
    model = common.fresh_model()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("classifier."))
    groups = [{"params": list(model.classifier.parameters()), "lr": common.HEAD_LR}]
    return common.train(model, groups, data, lr=common.HEAD_LR, seed=seed)


def main() -> None:
    pooled: dict = {}

    def run_one(key: str, seed: int) -> dict:
        pooled.update(pooled or embeddings(common.fresh_model("eval"), common.token_data()))
        if key == "head-100-steps":
            return head_only(seed, common.token_data())
        return run(seed, pooled) if key == "probe" else run_tuned(seed, pooled)

    every = common.sweep("probe", ["probe", "tuned", "head-100-steps"], run_one)
    if every is None:
        return
    runs = [r for r in every if r["key"] == "probe"]
    tuned = [r for r in every if r["key"] == "tuned"]
    head = [r for r in every if r["key"] == "head-100-steps"]
    accuracy = common.mean_std([r["accuracy"] for r in runs])
    common.write_json(
        "probe.json",
        {
            "setup": {"steps": PROBE_STEPS, "lr": common.HEAD_LR, "full_batch": True},
            "accuracy": accuracy,
            "train_accuracy": common.mean_std([r["train_accuracy"] for r in runs]),
            "tuned_accuracy": common.mean_std([r["accuracy"] for r in tuned]),
            "tuned_grid": GRID,
            "runs": runs,
            "tuned_runs": tuned,
            "head_100_steps_accuracy": common.mean_std([r["accuracy"] for r in head]),
            "head_100_steps_runs": head,
        },
    )
    print(f"linear probe on the frozen embedding: {common.fmt(*accuracy)} %")
    best = common.mean_std([r["accuracy"] for r in tuned])
    print(f"best of the grid, chosen on the eval set: {common.fmt(*best)} %")
    steps = common.mean_std([r["accuracy"] for r in head])
    print(f"head only, trained like every other setting: {common.fmt(*steps)} %")


if __name__ == "__main__":
    main()
