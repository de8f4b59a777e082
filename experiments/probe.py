"""Experiment 0: the frozen-backbone baseline — a linear probe on MiniLM's mean-pooled embedding.

The 384-number sentence embedding of every review is computed once with the pretrained model
(eval mode), then only the 2-way head (770 parameters) trains, to convergence: full-batch AdamW,
lr 1e-2, ``PROBE_STEPS`` steps, from the seed's own head initialisation. Every fine-tuning
setting has to beat this number to show that adapting the backbone matters.
Writes results/probe.json.
Run: PYTHONPATH=src python experiments/probe.py
"""

from __future__ import annotations

import common
import torch
from torch import nn

PROBE_STEPS = 2000


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


def run(seed: int, pooled: dict) -> dict:
    torch.manual_seed(seed)
    head = nn.Linear(384, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=common.HEAD_LR, weight_decay=0.0)
    for _ in range(PROBE_STEPS):
        loss = nn.functional.cross_entropy(head(pooled["train"]), pooled["train_labels"])
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
    }


def main() -> None:
    pooled: dict = {}

    def run_one(key: str, seed: int) -> dict:
        pooled.update(pooled or embeddings(common.fresh_model("eval"), common.token_data()))
        return run(seed, pooled)

    runs = common.sweep("probe", ["probe"], run_one)
    if runs is None:
        return
    accuracy = common.mean_std([r["accuracy"] for r in runs])
    common.write_json(
        "probe.json",
        {
            "setup": {"steps": PROBE_STEPS, "lr": common.HEAD_LR, "full_batch": True},
            "accuracy": accuracy,
            "train_accuracy": common.mean_std([r["train_accuracy"] for r in runs]),
            "runs": runs,
        },
    )
    print(f"linear probe on the frozen embedding: {common.fmt(*accuracy)} %")


if __name__ == "__main__":
    main()
