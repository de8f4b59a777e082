"""Continuing a run from its checkpoint: refuse settings that would make another run of it.

A resumed run must be the run that was interrupted: the same examples and batches (the data
plan: example count and lengths, a digest of the examples' tokens and labels, batch sizes,
steps; a checkpoint of an older lorakit without the digest is compared on the rest), the same
optimizer trajectory (learning rate and its schedule, weight decay, LoRA+ ratio, clipping, seed)
and the same adapter (alpha, dropout, ...; a different rank or target set already fails on the
tensors' shapes; module-name lists such as ``target_modules`` are compared as sets, their order
changes nothing). A checkpoint keeps each of these (``trainer_state.json``: ``data_plan``,
``training_config``, ``lora_config``), and ``check_resumable`` names every one that differs, with
its flag, before anything is loaded (and before the base is checked). The
base model must be the same too: the checkpoint's ``adapter/`` carries the fingerprint of the
base weights it was trained on (``lorakit.io.fingerprint``), and ``check_resume_base`` refuses
another base (``--model``, ``--quantization``). ``checkpoint_to_resume`` refuses ``--resume``
where there is no checkpoint (as ``transformers.Trainer`` does) instead of starting over. The
loop's last loss and evaluation come back from ``metrics.jsonl`` (``last_values``), so a run
resumed at its last step reports them as the uninterrupted run does.

One part of the plan follows the checkpoint rather than the run: whether the epoch's short batch
(``n mod G`` examples) is kept, as one process does, or dropped, as torchrun does
(``resumed_drop_last``), so that a checkpoint can be resumed under another process count with
the same global batch. Where this run's processes cannot split the short batch evenly, the
difference is refused, naming the way to resume. Other micro-batches of that global batch are
accepted, with dropout on with a warning (other masks: not bit-identical; ``check_resumable``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import UserError
from lorakit.train.batches import BatchOrder
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import TrainingConfig, flag_name
from lorakit.train.output_dir import previous_run_files
from lorakit.train.plan_differences import plan_differences, shown
from lorakit.train.settings import LORA_FLAGS

__all__ = [
    "TRAJECTORY_SETTINGS",
    "base_dtype",
    "check_resumable",
    "check_resume_base",
    "checkpoint_to_resume",
    "last_eval_step",
    "last_values",
    "planned_run",
    "resumed_drop_last",
    "steps_as_counted",
]

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

_UNORDERED_LORA_FIELDS = frozenset(
    ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")
)
"""``LoraConfig`` fields whose list value is a set of names (or layer indices): the same entries
in another order select the same modules."""


def resumed_drop_last(state: dict[str, Any], order: BatchOrder) -> bool:
    """Whether the run resuming the checkpoint of ``state`` drops the epoch's short batch: as the
    checkpoint's run did, where this run can (one process can drop it; processes can keep it
    when ``order.splits_short_batch``), else as ``order`` (this run's own plan) does, and
    ``check_resumable`` names the difference. Its epochs then have the checkpoint's length, so
    every remaining step takes the batch the interrupted run would have taken."""
    saved = str(state.get("data_plan", {}).get("short_batch", ""))
    if saved.startswith("dropped"):
        return True
    if saved.startswith("kept") and order.splits_short_batch:
        return False
    return order.drop_last


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
    differences = plan_differences(plan, saved_plan, saved_training)
    by_name = {f.name: f for f in fields(TrainingConfig)}
    for name in TRAJECTORY_SETTINGS:
        if name in saved_training and saved_training[name] != getattr(training, name):
            flag = flag_name(by_name[name]) if "help" in by_name[name].metadata else name
            now, saved = shown(getattr(training, name)), shown(saved_training[name])
            differences.append(f"{flag} {now} (the checkpoint's: {saved})")
    saved_lora = state.get("lora_config", {})
    for name, value in saved_lora.items():
        if name != "base_model_name_or_path" and not _same_lora_value(name, lora.get(name), value):
            flag = LORA_FLAGS.get(name, name)
            differences.append(f"{flag} {shown(lora.get(name))} (the checkpoint's: {shown(value)})")
    if differences:
        hint = _settings_hint(directory)
        raise UserError(
            f"checkpoint {directory} was written by a run with other data, batch, optimizer or "
            f"adapter settings: {'; '.join(differences)}. Resume with the checkpoint's "
            f"settings{hint}, or start a new run (a new --output, or --overwrite)"
        )
    _warn_of_another_split(saved_training, training, lora.get("lora_dropout"))


def _warn_of_another_split(saved_training: dict, training: TrainingConfig, dropout) -> None:
    """Warn (main process) where this run cuts the same global batch into other micro-batches
    than the checkpoint's with dropout on: other masks, so the continuation is not exact."""
    now = (training.batch_size, training.grad_accum)
    saved = (saved_training.get("batch_size", now[0]), saved_training.get("grad_accum", now[1]))
    if now == saved or not dropout or int(os.environ.get("RANK", "0")) != 0:
        return
    warnings.warn(
        f"resuming with --batch-size {now[0]} --grad-accum {now[1]} where the checkpoint's run "
        f"used --batch-size {saved[0]} --grad-accum {saved[1]} (the same global batch): "
        f"--dropout {dropout:g} draws its masks per micro-batch, so the continuation is not "
        "bit-identical to the uninterrupted run; resume with the checkpoint's values for that",
        stacklevel=3,  # the caller of check_resumable
    )


def _same_lora_value(name: str, value: Any, saved: Any) -> bool:
    """Whether ``LoraConfig`` field ``name`` has the same value in this run and the checkpoint:
    a list of ``_UNORDERED_LORA_FIELDS`` in any order, anything else exactly."""
    if name in _UNORDERED_LORA_FIELDS and isinstance(value, list) and isinstance(saved, list):
        return set(value) == set(saved)
    return value == saved


def _settings_hint(directory: Path, opening: str = " (", closing: str = ")") -> str:
    """``--config OUTPUT/train_settings.json --resume repeats them`` between ``opening`` and
    ``closing`` where the run of the checkpoint in ``directory`` recorded its settings, else
    nothing."""
    settings = Path(os.path.abspath(directory.parent.parent / "train_settings.json"))
    if not settings.is_file():  # (absolute: the hint works from any working directory)
        return ""
    return f"{opening}--config {settings} --resume repeats them{closing}"


def checkpoint_to_resume(output_dir: str | os.PathLike, resume: bool | str) -> Path | None:
    """The checkpoint ``resume`` names: None (no resume), the given path, or (True) the newest
    checkpoint in ``output_dir``. A path may be another run's checkpoint: that starts a new run
    from it, which ``output_dir.prepare_output_dir`` refuses over a run (``continues_run``
    tells them apart). Where there is none, a ``UserError`` naming the directory and
    what to do: resuming would silently start a new run, whose settings nothing checks, over
    what is there (``transformers.Trainer`` refuses it too)."""
    if not resume:
        return None
    if resume is not True:
        return Path(resume)
    found = latest_checkpoint(output_dir)
    if found is None:
        raise UserError(_no_checkpoint(Path(output_dir)))
    return found


def _no_checkpoint(output_dir: Path) -> str:
    """Why ``--resume`` has nothing to continue in ``output_dir``, and what to run instead."""
    start = f"--resume (resume=True): no checkpoint to resume in {output_dir}"
    previous = previous_run_files(output_dir)
    if previous:
        listed = ", ".join(name + ("/" if name != "metrics.jsonl" else "") for name in previous)
        return (
            f"{start}: it holds a run ({listed}) that wrote no checkpoint (they are written with "
            "--checkpoint-every N). Start that run over with --overwrite (deletes its files) "
            "instead of --resume, or choose another --output"
        )
    where = "it does not exist" if not output_dir.exists() else "it holds no training run"
    return f"{start} ({where}). Start a new run: the same command without --resume"


_BASE_REMEDY = (
    "Resume on the base model the checkpoint was trained on (the same --model and "
    "--quantization{hint}), or start a new run (a new --output, or --overwrite)."
)


def check_resume_base(model: nn.Module, directory: Path, adapter_name: str) -> None:
    """``BaseModelMismatchError`` (a ``UserError``) when the base weights of ``model`` are not
    those the checkpoint in ``directory`` was trained on: its ``adapter/`` holds their
    fingerprint (``lorakit.io.fingerprint``). A checkpoint without ``adapter/`` is not checked;
    an adapter file without the fingerprint, or one that does not cover every adapted module,
    is checked where it can be, with ``load_adapter``'s warning
    (``base_verdicts.unverified_note``). Call it before the model is sharded."""
    from lorakit.io import base_verdicts
    from lorakit.io.read import read_adapter_header
    from lorakit.state import lora_layers

    adapter = directory / "adapter"
    if not adapter.is_dir():
        return
    header = read_adapter_header(adapter)
    stored = header.fingerprint
    names = [name for name, layer in lora_layers(model) if adapter_name in layer.ranks]
    remedy = _BASE_REMEDY.format(hint=_settings_hint(directory, "; ", ""))
    note = base_verdicts.unverified_note(model, stored, adapter, names)
    if note is not None:
        warnings.warn(note, stacklevel=2)  # the caller of check_resume_base
    base_verdicts.refuse_other_base(
        model,
        stored,
        adapter,
        names,
        allow_mismatch=False,
        remedy=remedy,
        trained_on=header.config.base_model_name_or_path,
    )


def base_dtype(model: nn.Module) -> str | None:
    """The name of the dtype the frozen base computes in (``lorakit train --dtype``), as
    ``merge.model_float_dtype`` reads it; None for a model without float base weights."""
    from lorakit.merge import model_float_dtype

    dtype = model_float_dtype(model)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def planned_run(
    order: BatchOrder, training: TrainingConfig, state: dict[str, Any] | None
) -> tuple[BatchOrder, int, str | None]:
    """``(batch order, total steps, steps rule)`` of a run whose own plan is ``order``, resuming
    the checkpoint of ``state`` (None: a new run): the short batch as that checkpoint planned it
    where this run can (``resumed_drop_last``), and the length as it counted it
    (``steps_as_counted``). The training loop and ``lorakit train``'s announcement both ask."""
    if state is not None:
        order = replace(order, drop_last=resumed_drop_last(state, order))
    per_epoch = order.steps_per_epoch
    steps = training.total_steps(per_epoch) if per_epoch else 0
    if state is None or not per_epoch:
        return order, steps, None
    steps, rule = steps_as_counted(state, training, steps, per_epoch)
    return order, steps, rule


def steps_as_counted(
    state: dict[str, Any], training: TrainingConfig, total_steps: int, steps_per_epoch: int
) -> tuple[int, str | None]:
    """The run's length as its checkpoint counted it, and the rule (``"round"``, or None for
    this lorakit's): before the digest of the examples (``examples_sha256``) came, lorakit
    rounded a fractional ``--epochs`` half to even (``round``) where it now counts up (``ceil``,
    as transformers). A checkpoint of then, or of a run resumed from one (its data plan says
    ``steps_rule: "round"``), whose ``total_steps`` is that older count of the same
    ``--epochs`` (``steps_per_epoch``: this run's, which the rest of the data plan must match)
    keeps it, so the run resumes as planned, as often as it is resumed; any other length is
    compared as it is."""
    saved = state.get("data_plan", {})
    older_rule = "examples_sha256" not in saved or saved.get("steps_rule") == "round"
    if not older_rule or training.max_steps is not None:
        return total_steps, None
    older = max(1, round(training.epochs * steps_per_epoch))
    if saved.get("total_steps") == older != total_steps:
        return older, "round"
    return total_steps, None


def last_eval_step(records: list[dict[str, Any]]) -> int | None:
    """The step of the last evaluation record among ``metrics.jsonl``'s records (None: none)."""
    steps = [r.get("step") for r in records if any(k.startswith("eval_") for k in r)]
    return steps[-1] if steps else None


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
