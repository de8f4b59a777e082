"""Metrics of a run: one JSON object per line in ``metrics.jsonl`` and a loss-curve PNG.

Training records: ``{"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}``;
evaluation records: ``{"step", "eval_loss", "eval_<metric>"...}``. ``step`` counts optimizer
steps done (1-based), so resuming from the checkpoint of step ``t`` keeps records ``<= t``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_loss_curve", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics JSONL file (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to ``path``; ``truncate_after(step)`` drops records of steps after a
    resumed checkpoint (rewritten atomically)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def plot_loss_curve(
    records: list[dict[str, Any]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Training loss (and eval loss, if any) against step, saved as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train, strict=False), label="train loss", linewidth=1.2)
    if evals:
        axes.plot(*zip(*evals, strict=False), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean per target token)")
    axes.set_title(title or "lorakit training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)
    return path
