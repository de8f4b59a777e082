"""Issue 24: the intrinsic dimension d90 measured with Aghajanyan et al.'s protocol (SAID).

Model and data as every experiment (``common``: MiniLM-L6, six blocks, mean pooling, new 2-way
head; Rotten Tomatoes, 500 test / 1,600 train); ``--task subjectivity`` runs the same protocol on
the second task, subjective review snippets against objective plot-summary sentences of the same
corpus, balanced, same sizes (``common.subjectivity``: how Pang & Lee built SUBJ). Differences from experiment 5
(``intrinsic_dimension.py``): training to convergence with early stopping on a VALIDATION split
carved from the training data (the last ``--val-size`` of the 1,600 training examples; the model
trains on the rest), a learning-rate sweep per d (the lr is chosen per d on mean validation
accuracy over seeds, never on the test split), several seeds, the full and frozen baselines
trained with the same loop, and both d90 definitions with a bootstrap interval over seeds.

Settings (one JSON row each, appended atomically to ``results/<name>.runs.jsonl``; a killed run
loses only the run in progress, a rerun skips every row already there):

- ``said``: θ_D = every parameter of the six blocks (D = 10.6M, 96 tensors),
  θ_D^(i) = θ_0^(i) + λ_i (P θ_d)^(i), P Fastfood, λ_i one scalar per tensor (init 1);
  ``--head direct`` trains the head directly at ``common.HEAD_LR`` (not counted in d);
  ``--head subspace`` puts the head's 770 numbers into θ_D as well (then nothing but θ_d and λ
  trains). Subspace seed = run seed.
- ``full``: every parameter of the six blocks and the head (lr from ``--full-lrs``).
- ``frozen``: the head alone on the frozen backbone (lr ``common.HEAD_LR``).

Each run: AdamW (no weight decay), linear warm-up over ``--warmup`` steps then constant, batch 16;
validation accuracy every ``--eval-every`` steps; stops after ``--patience`` evaluations without
improvement or at ``--max-steps``; the best-validation state is restored and scored on the test
split. ``--budget-minutes``: no new run starts after the budget (rows already written stay).

Run:  PYTHONPATH=src nice -n 10 python3 experiments/said_study.py --budget-minutes 20 \\
          --seeds 0 1 --dims 1000 10000 --lrs 5e-3 2e-2
Report only (no training):  ... said_study.py --report   (writes results/<name>.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import common
import torch
from torch import nn

from lorakit.analysis.intrinsic import IntrinsicDimension, bootstrap_d90


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 300, 1000, 3000, 10000])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-3, 2e-2, 5e-2])
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--head", choices=("direct", "subspace"), default="direct")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--task", choices=sorted(common.TASKS), default="rotten_tomatoes")
    parser.add_argument("--name", default="said_study")
    parser.add_argument("--report", action="store_true", help="only summarise the rows")
    return parser.parse_args()


def splits(val_size: int, task: str = "rotten_tomatoes") -> dict[str, tuple[torch.Tensor, ...]]:
    """test = common's eval split of ``task``; its training split minus the last ``val_size``
    = train."""
    data = common.token_data(task)
    ids, mask, labels = common.split(data, "train")
    cut = len(labels) - val_size
    return {
        "train": (ids[:cut], mask[:cut], labels[:cut]),
        "val": (ids[cut:], mask[cut:], labels[cut:]),
        "test": common.split(data, "eval"),
    }


@torch.no_grad()
def accuracy(forward: nn.Module, part: tuple[torch.Tensor, ...]) -> float:
    ids, mask, labels = part
    forward.eval()
    correct = 0
    for index in common.batches(mask, 50, None):
        logits = forward(*common.trimmed(ids[index], mask[index]))
        correct += int((logits.argmax(-1) == labels[index]).sum())
    forward.train()
    return correct / len(labels)


def build(method: str, dimension: int, lr: float, seed: int, head: str):
    """(module to call, AdamW groups, trainable tensors, counted trainable numbers)."""
    top = common.fresh_model()
    head_params = list(top.classifier.parameters())
    if method == "frozen":
        top.layers.requires_grad_(False)
        return top, [{"params": head_params, "lr": common.HEAD_LR}], head_params, 770
    if method == "full":
        body = [p for p in top.layers.parameters()]
        groups = [{"params": body, "lr": lr}, {"params": head_params, "lr": common.HEAD_LR}]
        return top, groups, body + head_params, common.count(body + head_params)
    names = [n for n, p in top.named_parameters() if p.requires_grad]
    if head == "direct":
        names = [n for n in names if not n.startswith("classifier.")]
    wrapper = IntrinsicDimension(top, dimension, names, said=True, seed=seed)
    subspace = [wrapper.theta_d, wrapper.scales]
    groups = [{"params": subspace, "lr": lr}]
    if head == "direct":
        groups.append({"params": head_params, "lr": common.HEAD_LR})
    trainable = subspace + (head_params if head == "direct" else [])
    return wrapper, groups, trainable, wrapper.trainable_dimension


def early_stopping(step, validate, test, trainable, args) -> dict:
    """The loop every method shares: ``step(n)`` for n = 1 .. ``args.max_steps``; ``validate()``
    (an accuracy) before the first step, every ``args.eval_every`` steps and after the last; stop
    after ``args.patience`` evaluations without improvement; restore the ``trainable`` tensors of
    the best validation, score ``test()`` on them and return the record."""
    best = {"val": validate(), "step": 0}
    best_state = [t.detach().clone() for t in trainable]
    curve, stale, start = [(0, best["val"])], 0, time.perf_counter()
    for number in range(1, args.max_steps + 1):
        step(number)
        if number % args.eval_every and number != args.max_steps:
            continue
        val = validate()
        curve.append((number, val))
        if val > best["val"]:
            best, stale = {"val": val, "step": number}, 0
            best_state = [t.detach().clone() for t in trainable]
        else:
            stale += 1
            if stale >= args.patience:
                break
    with torch.no_grad():
        for tensor, saved in zip(trainable, best_state, strict=True):
            tensor.copy_(saved)
    return {
        "test_accuracy": test(),
        "val_accuracy": best["val"],
        "best_step": best["step"],
        "steps": curve[-1][0],
        "val_curve": curve,
        "seconds": time.perf_counter() - start,
    }


def run(method: str, dimension: int, lr: float, seed: int, args, parts) -> dict:
    """One training run with early stopping; the record of its best-validation state."""
    forward, groups, trainable, counted = build(method, dimension, lr, seed, args.head)
    ids, mask, labels = parts["train"]
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, args.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    order: list = []

    def step(_: int) -> None:
        if not order:
            order.extend(common.batches(mask, common.BATCH, generator))
        index = order.pop()
        loss = nn.functional.cross_entropy(
            forward(*common.trimmed(ids[index], mask[index])), labels[index]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    record = early_stopping(
        step,
        lambda: accuracy(forward, parts["val"]),
        lambda: accuracy(forward, parts["test"]),
        trainable,
        args,
    )
    return {**record, "counted_dimension": counted}


def read_rows(path) -> list[dict]:
    """Every complete row (a torn last line from a killed process is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path, row: dict) -> None:
    """One ``write`` of one line on an O_APPEND descriptor, then fsync: whole or absent."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (json.dumps(row) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def plan(args) -> list[tuple[str, int, float, int]]:
    """Baselines first (every seed), then d ascending, lr, seed."""
    jobs = [("frozen", 0, common.HEAD_LR, s) for s in args.seeds]
    jobs += [("full", 0, lr, s) for lr in args.full_lrs for s in args.seeds]
    jobs += [("said", d, lr, s) for d in sorted(args.dims) for lr in args.lrs for s in args.seeds]
    return jobs


def key(method: str, dimension: int, lr: float, seed: int, head: str) -> str:
    return f"{method}|d={dimension}|lr={lr:g}|seed={seed}|head={head}"


def train_all(args, path, jobs=None, run_one=None) -> None:
    """Each of ``jobs`` (default ``plan(args)``) without a row in ``path`` yet, trained by
    ``run_one(method, dimension, lr, seed)`` (default ``run`` on MiniLM), until the budget."""
    torch.set_num_threads(1)
    if run_one is None:
        parts = splits(args.val_size, args.task)

        def run_one(method, dimension, lr, seed):
            return run(method, dimension, lr, seed, args, parts)

    start = time.monotonic()
    for method, dimension, lr, seed in plan(args) if jobs is None else jobs:
        name = key(method, dimension, lr, seed, args.head)
        if any(r["key"] == name for r in read_rows(path)):
            continue
        if time.monotonic() - start > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes} min spent; stopping before {name}")
            return
        record = run_one(method, dimension, lr, seed)
        row = {"key": name, "method": method, "dimension": dimension, "lr": lr, "seed": seed}
        row.update(head=args.head, val_size=args.val_size, max_steps=args.max_steps, **record)
        row["task"] = args.task
        append_row(path, row)
        print(
            f"{name}: test {record['test_accuracy']:.3f} val {record['val_accuracy']:.3f} "
            f"best step {record['best_step']}/{record['steps']} ({record['seconds']:.0f} s)",
            flush=True,
        )


def best_lr(rows: list[dict]) -> dict[int, list[dict]]:
    """Per dimension, the rows of the lr with the highest mean validation accuracy, among the
    lrs run on the most seeds (a partly run lr is not compared on fewer seeds)."""
    chosen = {}
    for dimension in sorted({r["dimension"] for r in rows}):
        by_lr: dict[float, list[dict]] = {}
        for r in rows:
            if r["dimension"] == dimension:
                by_lr.setdefault(r["lr"], []).append(r)
        most = max(len(runs) for runs in by_lr.values())
        by_lr = {lr: runs for lr, runs in by_lr.items() if len(runs) == most}
        lr = max(by_lr, key=lambda v: statistics.fmean(r["val_accuracy"] for r in by_lr[v]))
        chosen[dimension] = by_lr[lr]
    return chosen


def report(args, path) -> None:
    rows = [
        r
        for r in read_rows(path)
        if r["head"] == args.head and r.get("task", "rotten_tomatoes") == args.task
    ]
    said = best_lr([r for r in rows if r["method"] == "said"])
    full = best_lr([r for r in rows if r["method"] == "full"]).get(0, [])
    frozen = [r for r in rows if r["method"] == "frozen"]
    if not (said and full and frozen):
        print("not enough rows yet for a report (need frozen, full and at least one d)")
        return
    test = {d: [r["test_accuracy"] for r in v] for d, v in said.items()}
    scores = [r["test_accuracy"] for r in full], [r["test_accuracy"] for r in frozen]
    found = bootstrap_d90(test, *scores)
    table = [
        {
            "setting": setting,
            "lr": group[0]["lr"],
            "seeds": sorted(r["seed"] for r in group),
            "test_accuracy": common.mean_std([r["test_accuracy"] for r in group]),
            "val_accuracy": common.mean_std([r["val_accuracy"] for r in group]),
            "steps": [r["steps"] for r in group],
            "best_step": [r["best_step"] for r in group],
            "counted_dimension": group[0]["counted_dimension"],
            "hours": sum(r["seconds"] for r in group) / 3600,
        }
        for setting, group in [("frozen", frozen), ("full", full)]
        + [(f"said d={d}", v) for d, v in said.items()]
    ]
    common.write_json(
        f"{args.name}.json",
        {"task": args.task, "head": args.head, "table": table, "d90": found, "rows": len(rows)},
    )
    plot_curve(table, found, args.task, common.RESULTS / f"{args.name}.png")
    print("| setting | lr | seeds | test acc % | val acc % | steps (best) | counted d | h |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        steps = ", ".join(f"{s} ({b})" for s, b in zip(t["steps"], t["best_step"], strict=True))
        print(
            f"| {t['setting']} | {t['lr']:g} | {t['seeds']} | {common.fmt(*t['test_accuracy'])} "
            f"| {common.fmt(*t['val_accuracy'])} | {steps} | {t['counted_dimension']:,} "
            f"| {t['hours']:.2f} |"
        )
    for name, value in found.items():
        print(f"d90 {name}: {value}")


def plot_curve(table: list[dict], found: dict, task: str, path) -> None:
    """Test and validation accuracy (mean ± std over seeds, best lr per d) against d, beside
    the frozen and full fine-tuning bands and the d90 of the gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.analysis.plots import save_figure

    said = [t for t in table if t["setting"].startswith("said")]
    dims = [int(t["setting"].split("=")[1]) for t in said]
    baselines = {t["setting"]: t for t in table if not t["setting"].startswith("said")}
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for axis, split in zip(axes, ("test_accuracy", "val_accuracy"), strict=True):
        means = [100 * t[split][0] for t in said]
        spreads = [100 * t[split][1] for t in said]
        axis.errorbar(dims, means, yerr=spreads, marker="o", capsize=3, label="SAID (best lr)")
        for name, color in (("frozen", "tab:red"), ("full", "black")):
            mean, spread = (100 * v for v in baselines[name][split])
            axis.axhspan(mean - spread, mean + spread, color=color, alpha=0.15)
            axis.axhline(mean, color=color, label=f"{name} (± std)")
        point = found["of_gain"]["point"] if split == "test_accuracy" else None
        if point:
            axis.axvline(point, color="tab:green", linestyle=":", label=f"d90 of gain = {point}")
        axis.set(xscale="log", xlabel="d", ylabel=f"{split.split('_')[0]} accuracy (%)")
        axis.legend(fontsize=8)
    figure.suptitle(f"SAID on MiniLM-L6, {task.replace('_', ' ')}")
    save_figure(figure, path)


def main() -> None:
    args = arguments()
    path = common.RESULTS / f"{args.name}.runs.jsonl"
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        train_all(args, path)
    report(args, path)


if __name__ == "__main__":
    main()
