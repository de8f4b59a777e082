"""Experiments 2-4 on a second model: SmolLM2-135M-Instruct on the demo's sentiment task.

The task and the scoring are ``lorakit demo``'s: Rotten Tomatoes reviews in the chat template
("Is this movie review positive or negative? Answer with one word. Review: ..."), the answer
learnt as the assistant turn (loss on the answer tokens only), accuracy = the share of the first
``EVAL_SIZE`` test reviews whose next-token log-probability of "positive" vs "negative" picks
the label (``lorakit.data.classify``, as the demo calls it). Settings, each for ``common.SEEDS``:

- ``full``: full fine-tuning of all 30 blocks and the final norm (106.2M numbers; the tied
  token embedding / lm_head stays frozen), lr 5e-5; the spectrum of its ΔW per module type
  (``update_spectra``, ``rank_advice``) — experiment 2 on this model;
- ``r1``, ``r4``, ``r16``: LoRA on all seven projections (q k v o gate up down), lora_alpha = 2r,
  no dropout, lr 1e-3 (the demo's) — experiment 3;
- ``qv_r21``: q_proj and v_proj only at r = 21, the same budget as all seven at r = 4 within
  0.9% (40,320 vs 40,704 per block) — experiment 4;
- ``zero_shot``: the untouched model (once: it has no randomness).

The constants (``MODEL``, ``STEPS``, ``BATCH``, ``MAX_LENGTH``, ``EVAL_SIZE``, the learning
rates, ``SETTINGS``) live in smollm2_settings.py, which smollm2_report.py records too.
Every setting trains with the same loop — lorakit's own pieces: ``BatchOrder`` (data order from the
seed), ``batch_loss_sum`` (mean CE over the answer tokens), ``build_optimizer`` (AdamW, no
weight decay), ``build_scheduler`` (10% warm-up, cosine to 0), gradient clipping at 1.0 — for
``STEPS`` steps of ``BATCH`` reviews at most ``MAX_LENGTH`` tokens. One thread.
Writes results/smollm2.runs.jsonl (resumable), smollm2.json, smollm2_accuracy.png,
smollm2_ranks.png and smollm2_spectra.png.
Run: PYTHONPATH=src python experiments/smollm2_rank.py   (or one seed at a time: --seed 0 / 1 / 2)
"""

from __future__ import annotations

import copy
import statistics
import time

import common
import smollm2_report
import torch
from smollm2_settings import (
    BATCH,
    EVAL_SIZE,
    FULL_LR,
    LORA_LR,
    MAX_LENGTH,
    MODEL,
    SETTINGS,
    STEPS,
)

import lorakit
from lorakit import data

KEYS = ["zero_shot", *SETTINGS]
_CACHE: dict = {}


def setup() -> dict:
    """The model (pristine copy), tokenizer, tokenised training reviews and held-out reviews."""
    if not _CACHE:
        from lorakit.models import load_model

        model, tokenizer = load_model(MODEL)
        train = data.load_examples("rotten-tomatoes", "train", style="chat")[: STEPS * BATCH]
        test = data.load_examples("rotten-tomatoes", "test", style="chat")[:EVAL_SIZE]
        _CACHE.update(
            model=model.eval(),
            tokenizer=tokenizer,
            train=data.tokenize_examples(train, tokenizer, MAX_LENGTH),
            test=test,
        )
    return _CACHE


def accuracy(model, cache: dict) -> float:
    """The demo's scoring: next-token log-probability of " positive" vs " negative"."""
    model.eval()
    result = data.classify(
        model, cache["tokenizer"], cache["test"], batch_size=32, max_length=MAX_LENGTH
    )
    return result.accuracy


def train(model, cache: dict, lr: float, seed: int) -> dict:
    """``STEPS`` AdamW steps on the trainable parameters; returns losses and wall time."""
    from lorakit.train import BatchOrder, build_optimizer
    from lorakit.train.losses import batch_loss_sum, target_count
    from lorakit.train.schedule import build_scheduler

    tokenized = cache["train"]
    plan = BatchOrder(len(tokenized.input_ids), BATCH, seed=seed)
    optimizer = build_optimizer(model, lr)
    scheduler = build_scheduler(optimizer, STEPS, max(1, STEPS // 10))
    parameters = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(STEPS):
        (indices,) = plan.micro_batches(step)
        batch = data.collate(tokenized, indices)
        loss_sum, _, _ = batch_loss_sum(model, batch)
        loss = loss_sum / target_count(batch)  # mean CE per answer token
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {
        "final_loss": statistics.fmean(losses[-5:]),
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "trainable": common.count(parameters),
    }


def run(key: str, seed: int) -> dict:
    cache = setup()
    base = cache["model"]
    if key == "zero_shot":
        start = time.perf_counter()
        return {"accuracy": accuracy(base, cache), "seconds": time.perf_counter() - start}
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # the adapter's initial A
    if SETTINGS[key] is None:
        model.get_input_embeddings().requires_grad_(False)  # tied with lm_head: stays frozen
        result = train(model, cache, FULL_LR, seed)
    else:
        targets, rank = SETTINGS[key]
        config = lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
        lorakit.inject(model, config)
        result = train(model, cache, LORA_LR, seed)
    start = time.perf_counter()
    result["accuracy"] = accuracy(model, cache)
    result["eval_seconds"] = time.perf_counter() - start
    if SETTINGS[key] is None:
        from lorakit.analysis import rank_advice, update_spectra

        spectra = update_spectra(base, model)
        result["layers"] = [s.to_dict() for s in spectra]
        for row in result["layers"]:  # all values (for the energy curves), 4 digits
            row["singular_values"] = [float(f"{v:.4g}") for v in row["singular_values"]]
        result["rank_advice_90"] = [a.to_dict() for a in rank_advice(spectra, 0.9)]
    return result


def main() -> None:
    runs = common.sweep("smollm2", KEYS, run, {"zero_shot": (0,)})
    if runs is None:
        return
    smollm2_report.report(runs)


if __name__ == "__main__":
    main()
