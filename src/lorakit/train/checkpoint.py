"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``<output_dir>/checkpoints/step-<NNNNNNNN>/``::

    adapter/                  the adapter in PEFT format (lorakit.io.save_adapter), for people
    trainable.safetensors     every trainable tensor by its model key (what resume loads)
    optimizer.safetensors     AdamW moments and step counts: ``state.<i>.<name>``
    rng.safetensors           torch + numpy RNG states
    trainer_state.json        step, data position, optimizer param groups, scheduler, Python RNG

Only safetensors and JSON: nothing is ever unpickled. The tensors are whole: under FSDP every
process gathers its pieces first (``TrainingState``, see ``lorakit.train.fsdp``) and process 0
writes the same files as a one-process run; loading cuts each process's piece back out.

A checkpoint is built in a temporary directory beside the final one, fsynced, and renamed into
place, and only the newest ``keep`` are kept (``lorakit.train.checkpoint_dirs``): a run killed at
any moment leaves the complete checkpoint or none, and no half-deleted one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import UserError
from lorakit.train.checkpoint_dirs import (
    STATE_FILE,
    checkpoint_root,
    fsync_tree,
    latest_checkpoint,
    prune,
    put_in_place,
    remove_stale_temporaries,
    removed_on_failure,
    step_directory,
    temporary_directory,
)
from lorakit.train.fsdp import shard_like
from lorakit.train.rng import capture_rng_state, restore_rng_state
from lorakit.train.training_state import TrainingState

__all__ = [
    "Checkpoint",
    "Saver",
    "TrainingState",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
    "training_state",
]

TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` restored: the optimizer step to continue from, and the state."""

    step: int
    directory: Path
    state: dict[str, Any]


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, adapter_name: str = "default"
) -> TrainingState:
    """The ``TrainingState`` of an unsharded model (FSDP: ``lorakit.train.fsdp``)."""
    from lorakit.io import save_adapter

    return TrainingState(
        trainable_tensors(model),
        optimizer.state_dict(),
        lambda directory: save_adapter(model, directory, adapter_name),
    )


class Saver:
    """Collects what a run saves of an unsharded model (under FSDP:
    ``lorakit.train.fsdp.ShardedSaver``, with the same methods)."""

    def __init__(self, adapter_name: str = "default") -> None:
        self.adapter_name = adapter_name

    def training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
        return training_state(model, optimizer, self.adapter_name)

    def adapter_writer(self, model: nn.Module) -> Callable[[Path], object]:
        """A function writing the adapter into a directory."""
        from lorakit.io import save_adapter

        return lambda directory: save_adapter(model, directory, self.adapter_name)


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


def _optimizer_tensors(state_dict: dict[str, Any]) -> tuple[dict, list]:
    tensors = {}
    for index, fields in state_dict["state"].items():
        for name, value in fields.items():
            tensors[f"state.{index}.{name}"] = _contiguous(torch.as_tensor(value))
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, directory: Path, groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(directory / "optimizer.safetensors").items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for index, fields in state.items():  # moments of a sharded parameter: this process's piece
        for name, tensor in fields.items():
            if index < len(parameters) and tensor.shape == parameters[index].shape:
                fields[name] = shard_like(tensor, parameters[index])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{model key: tensor}`` of every parameter that trains."""
    return {name: _contiguous(p) for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra_state: dict[str, Any],
    adapter_name: str = "default",
    keep: int = 2,
    *,
    state: TrainingState | None = None,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` atomically; prune to the newest ``keep``.

    ``state``: the model's and optimizer's tensors, whole (default: ``training_state(model,
    optimizer, adapter_name)``; under FSDP the gathered ones, see ``lorakit.train.fsdp``).

    Every file and directory is fsynced before the rename (and the parent after it), so a power
    cut cannot leave a renamed but empty checkpoint. A write that fails (a full disk) removes
    the temporary directory and raises a ``UserError``; the previous checkpoints stay. One
    interrupted (Ctrl-C) removes it too, and the ``KeyboardInterrupt`` goes on.
    """
    if state is None:
        state = training_state(model, optimizer, adapter_name)
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    final = step_directory(root, step)
    temporary = temporary_directory(final)
    try:
        with removed_on_failure(temporary):  # (Ctrl-C too: no half-written directory left)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            _write_files(temporary, step, state, scheduler, extra_state)
            fsync_tree(temporary)
            put_in_place(temporary, final)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk its own way
        shutil.rmtree(temporary, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no checkpoint kept"
        reason = getattr(error, "strerror", None) or error
        raise UserError(
            f"cannot write the checkpoint of step {step} in {root} ({reason}); {kept}. Free "
            "space (or fix the directory) and continue with --resume"
        ) from None
    prune(root, keep)
    return final


def _write_files(directory: Path, step, training: TrainingState, scheduler, extra_state):
    training.write_adapter(directory / "adapter")
    save_file(training.trainable, str(directory / "trainable.safetensors"))
    optimizer_tensors, groups = _optimizer_tensors(training.optimizer)
    save_file(optimizer_tensors, str(directory / "optimizer.safetensors"))
    rng_tensors, rng_fields = capture_rng_state()
    rng_tensors = {k: _contiguous(v) for k, v in rng_tensors.items()}
    save_file(rng_tensors, str(directory / "rng.safetensors"))
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "step": step,
        "optimizer_param_groups": groups,
        "scheduler": scheduler_state,
        "rng": rng_fields,
        **extra_state,
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def load_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Checkpoint:
    """Restore trainable tensors, optimizer, scheduler and RNG states from ``directory``.

    A damaged checkpoint (a file missing, truncated or not what lorakit writes) is a
    ``UserError`` naming it and the way back to the one before."""
    directory = Path(directory)
    state = read_state(directory)
    for name in TENSOR_FILES:
        if not (directory / name).is_file():
            raise UserError(_damaged(directory, f"{name} is missing"))
    try:
        tensors = load_file(directory / "trainable.safetensors")
        _restore_trainable(model, tensors, directory)
        _restore_optimizer(optimizer, directory, state["optimizer_param_groups"])
        lambdas = [None] * len(optimizer.param_groups)  # the schedule is rebuilt, not stored
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lambdas})
        restore_rng_state(load_file(directory / "rng.safetensors"), state["rng"])
        return Checkpoint(step=int(state["step"]), directory=directory, state=state)
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as error:
        raise UserError(_damaged(directory, error)) from None


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``; ``UserError`` when it is missing or damaged."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        raise UserError(f"{directory} is not a lorakit training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError) as error:  # (UnicodeDecodeError and JSONDecodeError too)
        raise UserError(_damaged(directory, error)) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(_damaged(directory, f"{STATE_FILE} holds no step"))
    return state


def _damaged(directory: Path, error: BaseException | str) -> str:
    what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return (
        f"checkpoint {directory} is damaged ({what}). Remove it (its run's older checkpoints "
        "stay) and --resume again to continue from the one before, or start over with "
        "--overwrite"
    )


def _restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(tensors):
        missing = sorted(set(parameters) - set(tensors))[:3]
        unexpected = sorted(set(tensors) - set(parameters))[:3]
        raise UserError(
            f"checkpoint {source} does not fit this model's trainable parameters (missing "
            f"{missing}, unexpected {unexpected}); resume with the same model and adapter settings"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.shape != tensors[name].shape:
                raise UserError(
                    f"checkpoint {source}: {name} has shape {tuple(tensors[name].shape)}, the "
                    f"model has {tuple(parameter.shape)}; resume with the same adapter settings"
                )
            parameter.copy_(shard_like(tensors[name], parameter))
