"""Combining two real adapters (issue 20 item 5): sentiment + chatterbot on SmolLM2-135M-Instruct.

Two LoRA adapters (r = 8, lora_alpha = 16, q_proj and v_proj, no dropout, lr 1e-3, AdamW with
lorakit's warm-up + cosine schedule) are trained on the built-in data, each for ``STEPS`` steps
of ``BATCH`` examples in the chat template: ``sentiment`` on Rotten Tomatoes reviews (answer
"positive"/"negative") and ``chat`` on the chatterbot question/answer pairs. They are combined
with weights 1 and 1 by every method of ``lorakit.combine`` (SVD methods at rank 8, pruning
methods at density 0.5, DARE seed 0) and each result is scored on both tasks, next to the base
model and the single adapters:

- sentiment: accuracy on the first ``EVAL_SIZE`` test reviews (next-token log-probability of
  "positive" vs "negative", as ``lorakit demo`` scores it; higher is better);
- chat: mean cross-entropy per answer token on the first ``EVAL_SIZE`` held-out chatterbot pairs
  (lower is better).

One CPU thread. Writes results/combine_tasks.json and prints the markdown table of
docs/combining.md.
Run: OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/combine_tasks.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import lorakit
from lorakit import data

MODEL = "smollm2-135m-instruct"
STEPS, BATCH, MAX_LENGTH, EVAL_SIZE, LR = 30, 8, 64, 100, 1e-3
CONFIG = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
COMBINATIONS = {  # label: combine() options, weights 1 and 1
    "cat (exact, r 16)": {"method": "cat"},
    "svd r 8": {"method": "svd", "rank": 8},
    "ties r 8, density 0.5": {"method": "ties", "rank": 8, "density": 0.5},
    "dare_linear r 8, density 0.5": {"method": "dare_linear", "rank": 8, "density": 0.5},
    "dare_ties r 8, density 0.5": {"method": "dare_ties", "rank": 8, "density": 0.5},
    "magnitude_prune r 8, density 0.5": {"method": "magnitude_prune", "rank": 8, "density": 0.5},
}
RESULTS = Path(__file__).resolve().parent / "results"


def train_adapter(model, tokenizer, name: str, dataset: str) -> float:
    """Inject adapter ``name``, train it on ``dataset``; returns the mean loss of the last 5 steps."""
    from lorakit.train import BatchOrder, build_optimizer
    from lorakit.train.losses import batch_loss_sum, target_count
    from lorakit.train.schedule import build_scheduler

    examples = data.load_examples(dataset, "train", style="chat")[: STEPS * BATCH]
    tokenized = data.tokenize_examples(examples, tokenizer, MAX_LENGTH)
    lorakit.inject(model, CONFIG, name)
    lorakit.set_active(model, [name])
    plan = BatchOrder(len(tokenized.input_ids), BATCH, seed=0)
    optimizer = build_optimizer(model, LR)
    scheduler = build_scheduler(optimizer, STEPS, max(1, STEPS // 10))
    torch.manual_seed(0)
    model.train()
    losses = []
    for step in range(STEPS):
        (indices,) = plan.micro_batches(step)
        batch = data.collate(tokenized, indices)
        loss_sum, _, _ = batch_loss_sum(model, batch)
        loss = loss_sum / target_count(batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses[-5:]) / 5


def scores(model, tokenizer, held_out: dict) -> dict:
    """Sentiment accuracy and chat loss per answer token of the model's current adapters."""
    from lorakit.train.losses import batch_loss_sum, target_count

    model.eval()
    with torch.no_grad():
        accuracy = data.classify(
            model, tokenizer, held_out["sentiment"], batch_size=32, max_length=MAX_LENGTH
        ).accuracy
        chat = held_out["chat"]
        total, count = 0.0, 0
        for start in range(0, len(chat.input_ids), 16):
            batch = data.collate(chat, range(start, min(start + 16, len(chat.input_ids))))
            loss_sum, _, _ = batch_loss_sum(model, batch)
            total, count = total + float(loss_sum), count + target_count(batch)
    return {"sentiment_accuracy": accuracy, "chat_loss": total / count}


def main() -> None:
    from lorakit.models import load_model

    torch.set_num_threads(1)
    started = time.perf_counter()
    model, tokenizer = load_model(MODEL)
    model.eval()
    held_out = {
        "sentiment": data.load_examples("rotten-tomatoes", "test", style="chat")[:EVAL_SIZE],
        "chat": data.tokenize_examples(
            data.load_examples("chatterbot", "test", style="chat")[:EVAL_SIZE],
            tokenizer,
            MAX_LENGTH,
        ),
    }
    rows = {"base model": scores(model, tokenizer, held_out)}
    training = {
        name: train_adapter(model, tokenizer, name, dataset)
        for name, dataset in (("sentiment", "rotten-tomatoes"), ("chat", "chatterbot"))
    }
    for name in ("sentiment", "chat"):
        with lorakit.use_adapters(model, [name]):
            rows[f"{name} adapter alone"] = scores(model, tokenizer, held_out)
    with lorakit.use_adapters(model, ["sentiment", "chat"]):
        rows["both adapters active (reference)"] = scores(model, tokenizer, held_out)
    energies = {}
    for index, (label, options) in enumerate(COMBINATIONS.items()):
        result = lorakit.combine(["sentiment", "chat"], [1.0, 1.0], model=model, **options)
        result.add_to(model, f"mix{index}")
        energies[label] = min(report.energy_kept for report in result.modules)
        with lorakit.use_adapters(model, [f"mix{index}"]):
            rows[label] = scores(model, tokenizer, held_out) | {
                "lowest_energy_kept": energies[label]
            }
    report = {
        "settings": {
            "model": MODEL,
            "steps": STEPS,
            "batch": BATCH,
            "max_length": MAX_LENGTH,
            "eval_size": EVAL_SIZE,
            "lr": LR,
            "config": CONFIG.to_dict(),
        },
        "final_training_loss": training,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "combine_tasks.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| adapter | sentiment accuracy | chat loss / token | lowest energy kept |")
    print("|---|---|---|---|")
    for label, row in rows.items():
        energy = row.get("lowest_energy_kept")
        shown = "" if energy is None else f"{energy:.3f}"
        print(f"| {label} | {row['sentiment_accuracy']:.3f} | {row['chat_loss']:.3f} | {shown} |")
    print(f"\n{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
