"""The output directory of a training run: one run per directory.

A run writes ``adapter/``, ``checkpoints/``, ``metrics.jsonl``, ``loss_curve.png`` and (from the
CLI) ``train_settings.json``. Training into a directory that already holds a run's
``adapter/``, ``checkpoints/`` or ``metrics.jsonl`` would mix the two runs (metrics appended to
the old ones, old checkpoints picked up by a later resume), so a new run refuses it unless it
resumes that run or is told to overwrite it; overwriting deletes those files (and only those).
Resuming continues the run in the directory only from one of its own checkpoints (under
``<output_dir>/checkpoints``): a checkpoint of another run may start this one only in a
directory that holds no run, or with overwrite (``continues_run``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lorakit.errors import UserError
from lorakit.train.checkpoint_dirs import checkpoint_root

__all__ = ["RUN_FILES", "continues_run", "prepare_output_dir", "previous_run_files"]

# What a training run writes into its output directory (what --overwrite deletes).
RUN_FILES = ("adapter", "checkpoints", "metrics.jsonl", "loss_curve.png", "train_settings.json")
# The files that say a directory holds a previous run.
_MARKERS = ("adapter", "checkpoints", "metrics.jsonl")


def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """The names of the previous run's marker files in ``output_dir`` (empty: none)."""
    directory = Path(output_dir)
    return [name for name in _MARKERS if (directory / name).exists()]


def continues_run(output_dir: str | os.PathLike, resume: bool | str | os.PathLike) -> bool:
    """Whether ``resume`` continues the run in ``output_dir``: True (its newest checkpoint), or
    a checkpoint path inside ``output_dir/checkpoints`` (compared resolved: symlinks and ``..``
    followed). False: no resume, or a checkpoint of another run."""
    if not resume:
        return False
    if resume is True:
        return True
    own = checkpoint_root(output_dir).resolve()
    return Path(resume).resolve().is_relative_to(own)


def prepare_output_dir(
    output_dir: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike,
    overwrite: bool,
    is_main: bool = True,
    delete: bool = True,
) -> None:
    """Refuse to start a run in a directory holding a previous one, unless ``resume`` continues
    it (True, or a path to one of its own checkpoints: ``continues_run``) or ``overwrite`` (the
    main process deletes the previous run's ``RUN_FILES``; ``delete=False`` only checks, for a
    caller that deletes later, once nothing can fail). A ``resume`` path to another run's
    checkpoint counts as a new run here: it is refused over a previous run unless
    ``overwrite``, else its records would be mixed with that run's (metrics, checkpoints).
    """
    continues = continues_run(output_dir, resume)
    if continues and overwrite:
        raise UserError("--resume continues the previous run and --overwrite deletes it; give one")
    found = previous_run_files(output_dir)
    if continues or not found:
        return
    listed = ", ".join(name + ("/" if name != "metrics.jsonl" else "") for name in found)
    if not overwrite and resume:
        raise UserError(_foreign_checkpoint(Path(output_dir), Path(resume), listed))
    if not overwrite:
        raise UserError(_previous_run(Path(output_dir), listed))
    if not (is_main and delete):  # under torchrun, the main process deletes
        return
    directory = Path(output_dir)
    for name in RUN_FILES:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _previous_run(output_dir: Path, listed: str) -> str:
    """Why a new run is refused over the run in ``output_dir`` (its ``listed`` files), and the
    ways out that work: ``--resume`` only where that run wrote a checkpoint (one interrupted
    before its first has none: ``--resume`` would be refused in turn)."""
    from lorakit.train.checkpoint_dirs import latest_checkpoint

    deletes = "(TrainingConfig(overwrite=True); deletes that run's files)"
    if latest_checkpoint(output_dir) is None:
        return (
            f"output directory {output_dir} holds a previous training run ({listed}) that wrote "
            "no checkpoint, so --resume cannot continue it (checkpoints are written with "
            f"--checkpoint-every N): start it over with --overwrite {deletes}, or choose another "
            "output directory"
        )
    return (
        f"output directory {output_dir} holds a previous training run ({listed}); continue "
        f"it with --resume (resume=True), replace it with --overwrite {deletes}, or choose "
        "another output directory"
    )


def _foreign_checkpoint(output_dir: Path, checkpoint: Path, listed: str) -> str:
    """Why resuming ``checkpoint`` (of another run) into ``output_dir`` (holding the run of
    ``listed`` files) is refused, and the ways out: ``resume=True`` first where that directory
    has checkpoints (its own run, e.g. one this checkpoint started, continues)."""
    own = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    into_own = (
        f"its own run's directory {own} (output_dir={str(own)!r}, the same resume)"
        if own is not None
        else "its own run's output directory"
    )
    continue_own = (
        f"To continue the run in {output_dir} (e.g. one started from this checkpoint and then "
        "interrupted), resume=True resumes it from its newest checkpoint. "
        if "checkpoints" in listed
        else ""
    )
    return (
        f"resume={str(checkpoint)!r} is a checkpoint of another run than the one in output "
        f"directory {output_dir} ({listed}): resuming it there would mix the two runs' metrics "
        f"and checkpoints. {continue_own}To start from this checkpoint, resume it into "
        f"{into_own}, or into a new or empty output directory, or replace the run in "
        f"{output_dir} with TrainingConfig(overwrite=True) (deletes that run's files)"
    )


def write_final_adapter(write, directory: Path, output_dir: Path) -> UserError | None:
    """Call ``write(directory)`` (the trained adapter); a failed write (a full disk) is
    returned as a ``UserError`` that says where the weights still are (the newest checkpoint
    under ``output_dir``, if any), with an adapter directory this call made removed again."""
    from safetensors import SafetensorError

    from lorakit.train.checkpoint_dirs import latest_checkpoint

    made = not directory.exists()
    try:
        write(directory)
    except (OSError, SafetensorError) as error:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        newest = latest_checkpoint(output_dir)
        where = (
            f"the newest checkpoint, {newest}, holds its step's weights: free space and finish "
            "the run with --resume"
            if newest is not None
            else "no checkpoint was written, so this run's weights are lost: free space and run "
            "again (--checkpoint-every N keeps them on the way)"
        )
        reason = getattr(error, "strerror", None) or error
        return UserError(f"cannot write the trained adapter to {directory} ({reason}); {where}")
    return None
