"""Training from a settings dictionary (what ``lorakit train`` builds from flags/config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.train.loop import TrainResult

__all__ = ["train_from_settings"]


def _lora_config(settings: dict[str, Any]):
    from lorakit import LoraConfig

    try:
        return LoraConfig(
            r=settings["r"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules=settings["target_modules"],
        )
    except (ValueError, TypeError) as error:
        raise UserError(f"invalid LoRA settings: {error}") from None


def _training_config(settings: dict[str, Any]):
    from lorakit.train.config import TrainingConfig

    return TrainingConfig(
        output_dir=str(settings["output"]),
        max_steps=settings["steps"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        grad_accum=settings["grad_accum"],
        lr=settings["lr"],
        loraplus_ratio=settings["loraplus_ratio"],
        weight_decay=settings["weight_decay"],
        warmup_ratio=settings["warmup_ratio"],
        max_grad_norm=settings["max_grad_norm"],
        eval_every=settings["eval_every"],
        checkpoint_every=settings["checkpoint_every"],
        keep_checkpoints=settings["keep_checkpoints"],
        seed=settings["seed"],
        gradient_checkpointing=bool(settings["gradient_checkpointing"]),
        progress=not settings["no_progress"],
    )


def train_from_settings(settings: dict[str, Any]) -> TrainResult:
    """Load model and data, inject LoRA, train, save (adapter, metrics, loss curve, settings)."""
    import torch

    import lorakit
    from lorakit import data
    from lorakit.models import load_model
    from lorakit.train.cli_options import load_examples_for
    from lorakit.train.loop import train

    training = _training_config(settings)
    lora = _lora_config(settings)
    examples = load_examples_for(settings["data"], settings["split"], settings["style"], "train")
    eval_examples = None
    if settings["eval_data"]:
        eval_examples = load_examples_for(
            settings["eval_data"], settings["eval_split"], settings["style"], "validation"
        )
    torch.manual_seed(settings["seed"])  # the adapter's initial A
    model, tokenizer = load_model(settings["model"])
    try:
        lorakit.inject(model, lora)
    except ValueError as error:
        raise UserError(str(error)) from None
    tokenized = data.tokenize_examples(examples, tokenizer, settings["max_length"])
    eval_tokenized = (
        data.tokenize_examples(eval_examples, tokenizer, settings["max_length"])
        if eval_examples
        else None
    )
    output = Path(settings["output"])
    output.mkdir(parents=True, exist_ok=True)
    (output / "train_settings.json").write_text(json.dumps(settings, indent=1, default=str))
    tokenized_all = {"train": tokenized, "eval": eval_tokenized}

    def collate(items):  # items are ("train"|"eval", index) pairs
        source = tokenized_all[items[0][0]]
        return data.collate(source, [index for _, index in items])

    def length_of(item) -> int:  # batches group examples of similar length
        return len(tokenized_all[item[0]].input_ids[item[1]])

    result = train(
        model,
        [("train", i) for i in range(len(tokenized))],
        collate,
        training,
        eval_data=[("eval", i) for i in range(len(eval_tokenized))] if eval_tokenized else None,
        resume=bool(settings["resume"]),
        length_of=length_of,
    )
    return result
