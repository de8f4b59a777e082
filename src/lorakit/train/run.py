"""Training from a settings dictionary (what ``lorakit train`` builds from flags/config)."""

from __future__ import annotations

import json
import os
import sys
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


# TrainingConfig fields whose flag is not ``--`` + the field name with dashes.
_FLAGS = {"output_dir": "--output", "max_steps": "--steps", "progress": "--no-progress"}


def _training_config(settings: dict[str, Any]):
    """The ``TrainingConfig`` of the settings; a bad value is reported by its flag's name."""
    from lorakit.train.config import SettingError

    try:
        return _build_training_config(settings)
    except SettingError as error:
        flag = _FLAGS.get(error.setting, "--" + error.setting.replace("_", "-"))
        raise UserError(f"{flag} {error.problem}") from None


def _build_training_config(settings: dict[str, Any]):
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
        overwrite=bool(settings["overwrite"]),
    )


def check_targets_before_loading(model_directory, lora) -> None:
    """Inject ``lora`` into the model built on the meta device (no weights, no memory), so that
    target modules that match nothing are reported before the weights load. A model that
    cannot be built that way is left to the real load to judge."""
    import lorakit
    from lorakit.meta_model import build_meta_model

    try:
        meta_model, _ = build_meta_model(str(model_directory))
    except UserError:
        return
    try:
        lorakit.inject(meta_model, lora)
    except (ValueError, TypeError) as error:  # TypeError: a module lorakit cannot adapt
        raise UserError(str(error)) from None


def train_from_settings(settings: dict[str, Any]) -> TrainResult:
    """Check the settings, the data and the LoRA targets, then load the model, inject LoRA,
    train and save (adapter, metrics, loss curve, settings)."""
    import torch

    import lorakit
    from lorakit import data
    from lorakit.models import check_model_spec, load_model, resolve_model
    from lorakit.train.cli_options import load_examples_for
    from lorakit.train.output_dir import prepare_output_dir

    training = _training_config(settings)
    lora = _lora_config(settings)
    check_model_spec(settings["model"])
    examples = load_examples_for(settings["data"], settings["split"], settings["style"], "train")
    eval_examples = None
    if settings["eval_data"]:
        eval_examples = load_examples_for(
            settings["eval_data"], settings["eval_split"], settings["style"], "validation"
        )
    check_targets_before_loading(resolve_model(settings["model"]), lora)
    # only now that every check passed may --overwrite delete; under torchrun, rank 0 writes
    main = int(os.environ.get("RANK", "0")) == 0
    prepare_output_dir(
        settings["output"],
        resume=bool(settings["resume"]),
        overwrite=training.overwrite,
        is_main=main,
    )
    model, tokenizer = load_model(settings["model"], progress=False)
    torch.manual_seed(settings["seed"])  # the adapter's initial A, whatever the loading drew
    try:
        lorakit.inject(model, lora)
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None
    tokenized = {"train": data.tokenize_examples(examples, tokenizer, settings["max_length"])}
    if eval_examples:
        tokenized["eval"] = data.tokenize_examples(eval_examples, tokenizer, settings["max_length"])
    output = Path(settings["output"])
    output.mkdir(parents=True, exist_ok=True)
    if main:
        (output / "train_settings.json").write_text(json.dumps(settings, indent=1, default=str))
        _announce(model, tokenized, training, settings["max_length"])
    return _train_tokenized(model, tokenized, training, bool(settings["resume"]))


def _announce(model, tokenized: dict, training, max_length: int) -> None:
    """Say on stderr what the run will do (examples, optimizer steps, trainable parameters), and
    how many examples ``max_length`` shortened."""
    from lorakit.accounting import count_parameters
    from lorakit.train.batches import BatchPlan

    for part, kind in (("train", "training"), ("eval", "evaluation")):
        if part in tokenized and tokenized[part].num_truncated:
            print(
                f"lorakit: warning: {tokenized[part].num_truncated} of {len(tokenized[part])} "
                f"{kind} examples are longer than --max-length {max_length} tokens and were "
                "shortened; raise --max-length to train on them whole",
                file=sys.stderr,
            )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    examples = len(tokenized["train"])
    plan = BatchPlan(
        examples, training.batch_size, training.grad_accum, processes, drop_last=processes > 1
    )
    steps = training.total_steps(plan.steps_per_epoch) if plan.steps_per_epoch else 0
    counts = count_parameters(model)
    print(
        f"lorakit: training on {examples} examples, {steps} optimizer steps of "
        f"{plan.global_batch} examples, {counts.trainable:,} trainable parameters "
        f"({100 * counts.trainable / counts.total:.2f}% of {counts.total:,})",
        file=sys.stderr,
    )


def _train_tokenized(model, tokenized: dict, training, resume: bool) -> TrainResult:
    """Train on ``tokenized["train"]`` (and evaluate on ``tokenized["eval"]`` if present); the
    loop's examples are ``("train"|"eval", index)`` pairs."""
    from lorakit import data
    from lorakit.train.loop import train

    def collate(items):
        return data.collate(tokenized[items[0][0]], [index for _, index in items])

    def length_of(item) -> int:  # batches group examples of similar length
        return len(tokenized[item[0]].input_ids[item[1]])

    eval_items = (
        [("eval", i) for i in range(len(tokenized["eval"]))] if "eval" in tokenized else None
    )
    return train(
        model,
        [("train", i) for i in range(len(tokenized["train"]))],
        collate,
        training,
        eval_data=eval_items,
        resume=resume,
        length_of=length_of,
    )
