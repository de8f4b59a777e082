"""Training checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``<output_dir>/checkpoints/step-<NNNNNNNN>/``::

    adapter/                  the adapter in PEFT format (lorakit.io.save_adapter), for people
    trainable.safetensors     every trainable tensor by its model key (what resume loads)
    optimizer.safetensors     AdamW moments and step counts: ``state.<i>.<name>``
    rng.safetensors           torch + numpy RNG states
    trainer_state.json        step, data position, optimizer param groups, scheduler, Python RNG

Only safetensors and JSON: nothing is ever unpickled. A checkpoint is built in a temporary
directory beside the final one, fsynced, and renamed into place (``os.replace``), so a run killed
at any moment leaves either the complete checkpoint or none (a killed writer's temporary
directory is removed by a later save). Only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import UserError
from lorakit.train.rng import capture_rng_state, restore_rng_state

__all__ = ["Checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TEMPORARY = ".tmp-"  # + the final name + "-<pid>" of the writing process


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` restored: the optimizer step to continue from, and the state."""

    step: int
    directory: Path
    state: dict[str, Any]


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    state_dict = optimizer.state_dict()
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
) -> Path:
    """Write the checkpoint of optimizer step ``step`` atomically; prune to the newest ``keep``.

    Every file and directory is fsynced before the rename (and the parent after it), so a power
    cut cannot leave a renamed but empty checkpoint. A write that fails (a full disk) removes
    the temporary directory and raises a ``UserError``; the previous checkpoints stay.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / f"{_PREFIX}{step:08d}"
    temporary = root / f"{_TEMPORARY}{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        _write_files(temporary, step, model, optimizer, scheduler, extra_state, adapter_name)
        _fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _fsync(root)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no checkpoint kept"
        raise UserError(
            f"cannot write the checkpoint of step {step} in {root} "
            f"({error.strerror or error}); {kept}. Free space (or fix the directory) and "
            "continue with --resume"
        ) from None
    _prune(root, keep)
    return final


def _write_files(directory: Path, step, model, optimizer, scheduler, extra_state, adapter_name):
    from lorakit.io import save_adapter

    save_adapter(model, directory / "adapter", adapter_name)
    save_file(trainable_tensors(model), str(directory / "trainable.safetensors"))
    optimizer_tensors, groups = _optimizer_tensors(optimizer)
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


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directories, deepest first."""
    directories = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)
    for path in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        _fsync(path)


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary checkpoint directories of killed writers: the process named in the directory
    no longer exists on this machine, and nothing was added to the directory for a minute."""
    for leftover in root.glob(f"{_TEMPORARY}*"):
        pid_text = leftover.name.rsplit("-", 1)[-1]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid == os.getpid() or (pid is not None and _process_exists(pid)):
            continue
        try:
            stale = time.time() - leftover.stat().st_mtime > 60
        except OSError:
            continue
        if stale:
            shutil.rmtree(leftover, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def _prune(root: Path, keep: int) -> None:
    for old in _checkpoint_dirs(root)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    found = _checkpoint_dirs(checkpoint_root(output_dir))
    return found[-1] if found else None


def load_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Checkpoint:
    """Restore trainable tensors, optimizer, scheduler and RNG states from ``directory``."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        raise UserError(f"{directory} is not a lorakit training checkpoint (no {STATE_FILE})")
    state = json.loads((directory / STATE_FILE).read_text())
    _restore_trainable(model, load_file(directory / "trainable.safetensors"), directory)
    _restore_optimizer(optimizer, directory, state["optimizer_param_groups"])
    lambdas = [None] * len(optimizer.param_groups)  # the schedule function is rebuilt, not stored
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lambdas})
    restore_rng_state(load_file(directory / "rng.safetensors"), state["rng"])
    return Checkpoint(step=int(state["step"]), directory=directory, state=state)


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
            parameter.copy_(tensors[name])
