"""Continuing a run from its checkpoint: refuse settings that would make another run of it.

A resumed run must be the run that was interrupted: the same batches (the data plan: example
count and lengths, batch sizes, steps), the same optimizer trajectory (learning rate and its
schedule, weight decay, LoRA+ ratio, clipping, seed) and the same adapter (alpha, dropout, ...;
a different rank or target set already fails on the tensors' shapes). A checkpoint keeps each of
these (``trainer_state.json``: ``data_plan``, ``training_config``, ``lora_config``), and
``check_resumable`` names every one that differs, with its flag, before anything is loaded. The
loop's last loss and evaluation come back from ``metrics.jsonl`` (``last_values``), so a run
resumed at its last step reports them as the uninterrupted run does.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.train.config import TrainingConfig, flag_name

__all__ = ["TRAJECTORY_SETTINGS", "check_resumable", "last_values"]

TRAJECTORY_SETTINGS = (
    "lr",
    "loraplus_ratio",
    "weight_decay",
    "warmup_steps",
    "warmup_ratio",
    "min_lr_ratio",
    "max_grad_norm",
    "seed",
)
"""The ``TrainingConfig`` fields a resumed run must share with its checkpoint (the batch
settings are checked through the data plan)."""

_LORA_FLAGS = {"r": "--r", "lora_alpha": "--alpha", "lora_dropout": "--dropout"}


def check_resumable(
    directory: Path,
    state: dict[str, Any],
    plan: dict[str, Any],
    training: TrainingConfig,
    lora: dict[str, Any],
) -> None:
    """``UserError`` naming what differs between this run (``plan``, ``training``, the adapter's
    ``lora`` config as ``LoraConfig.to_dict()``) and the checkpoint in ``directory`` (its
    ``state``). A setting a checkpoint of an older lorakit did not keep is not compared."""
    saved_plan = state.get("data_plan", {})
    if saved_plan and "batches" not in saved_plan:
        raise UserError(
            f"checkpoint {directory} was written by a lorakit that drew batches by plain "
            "shuffling; this one groups them by length, so the run cannot continue with the "
            "same batches. Start a new run (a new --output, or without --resume)."
        )
    saved_training = state.get("training_config", {})
    differences = [
        f"{key.replace('_', ' ')} {plan.get(key)!r} (the checkpoint's: {saved_plan[key]!r})"
        for key in saved_plan
        if saved_plan[key] != plan.get(key) and key not in saved_training  # (named below)
    ]
    by_name = {f.name: f for f in fields(TrainingConfig)}
    for name in TRAJECTORY_SETTINGS:
        if name in saved_training and saved_training[name] != getattr(training, name):
            shown = flag_name(by_name[name]) if "help" in by_name[name].metadata else name
            differences.append(
                f"{shown} {getattr(training, name)!r} (the checkpoint's: {saved_training[name]!r})"
            )
    saved_lora = state.get("lora_config", {})
    for name, value in saved_lora.items():
        if name != "base_model_name_or_path" and lora.get(name) != value:
            shown = _LORA_FLAGS.get(name, name)
            differences.append(f"{shown} {lora.get(name)!r} (the checkpoint's: {value!r})")
    if differences:
        settings = directory.parent.parent / "train_settings.json"
        hint = f" (--config {settings} --resume repeats them)" if settings.is_file() else ""
        raise UserError(
            f"checkpoint {directory} was written by a run with other data, batch, optimizer or "
            f"adapter settings: {'; '.join(differences)}. Resume with the checkpoint's "
            f"settings{hint}, or start a new run (a new --output, or --overwrite)"
        )


def last_values(records: list[dict[str, Any]]) -> tuple[float | None, dict[str, float]]:
    """``(last training loss, last evaluation)`` among ``metrics.jsonl``'s records (the eval
    keys without their ``eval_`` prefix)."""
    loss, evaluation = None, {}
    for record in records:
        if "loss" in record:
            loss = record["loss"]
        measured = {k[len("eval_") :]: v for k, v in record.items() if k.startswith("eval_")}
        if measured:
            evaluation = measured
    return loss, evaluation
