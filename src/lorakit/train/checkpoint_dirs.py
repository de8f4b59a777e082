"""Where training checkpoints live, and how a directory gets there and goes away.

``<output_dir>/checkpoints/step-<NNNNNNNN>/`` holds optimizer step N's checkpoint
(``lorakit.train.checkpoint`` writes its files); a directory counts as a checkpoint only once it
holds ``trainer_state.json``. A checkpoint is written into ``.tmp-step-<N>-<pid>`` beside its
final name, fsynced whole, and renamed into place (``put_in_place``), so a run killed at any
moment leaves the complete checkpoint or none. A temporary directory left by a killed writer
(its process gone, nothing added for a minute) is removed by the next save
(``remove_stale_temporaries``); a save or prune that fails or is interrupted (Ctrl-C's
``KeyboardInterrupt``) removes its own temporary directory on the way out
(``removed_on_failure``), so only a killed process leaves one. Pruning renames a checkpoint to a temporary name before
deleting it, so a process killed while pruning leaves no half-deleted ``step-*`` either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from lorakit.io.atomic import sync

__all__ = [
    "STATE_FILE",
    "checkpoint_dirs",
    "checkpoint_root",
    "fsync_tree",
    "latest_checkpoint",
    "prune",
    "put_in_place",
    "remove_stale_temporaries",
    "removed_on_failure",
    "step_directory",
    "temporary_directory",
]

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TEMPORARY = ".tmp-"  # + the final name + "-<pid>" of the writing process


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_directory(root: Path, step: int) -> Path:
    """The checkpoint directory of optimizer step ``step`` under ``root``."""
    return root / f"{_PREFIX}{step:08d}"


def temporary_directory(final: Path) -> Path:
    """Where this process builds the checkpoint that becomes ``final``."""
    return final.parent / f"{_TEMPORARY}{final.name}-{os.getpid()}"


@contextlib.contextmanager
def removed_on_failure(temporary: Path) -> Iterator[None]:
    """Around the writing or deleting of this process's ``temporary`` directory: when the block
    raises (a full disk, or Ctrl-C: ``KeyboardInterrupt``, any ``BaseException``), the
    directory is removed before the exception goes on. A run that ends soon after would
    otherwise leave it behind (``remove_stale_temporaries`` spares a fresh one, for a minute);
    other processes' temporaries are never touched."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # (the exception raised is the one to report)
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def put_in_place(temporary: Path, final: Path) -> None:
    """Rename the complete ``temporary`` to ``final`` (``os.replace``) and fsync the parent. A
    checkpoint already at ``final`` (a run resumed from an older checkpoint saves this step
    again) is moved aside whole first and deleted after: a crash leaves it, never half of it;
    an exception (Ctrl-C) between the two renames puts it back, one after them deletes it."""
    replaced = None
    try:
        if final.exists():
            replaced = final.parent / f"{_TEMPORARY}old-{final.name}-{os.getpid()}"
            os.replace(final, replaced)
        os.replace(temporary, final)
    except BaseException:
        if replaced is not None and replaced.exists():  # (the new one in place, or not yet)
            if final.exists():
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.replace(replaced, final)
        raise
    sync(final.parent)
    if replaced is not None:
        with removed_on_failure(replaced):
            shutil.rmtree(replaced, ignore_errors=True)


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directories, deepest first."""
    directories = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
    for path in directory.rglob("*"):
        if path.is_file():
            sync(path)
    for path in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        sync(path)


def remove_stale_temporaries(root: Path) -> None:
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


def checkpoint_dirs(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (at least one). Each is first renamed to
    a temporary name (``os.replace``, atomic), then deleted: a process killed mid-deletion
    leaves a temporary directory, which a later save removes, never a half-deleted
    ``step-*`` that would still count as a checkpoint."""
    for old in checkpoint_dirs(root)[: -max(keep, 1)]:
        doomed = root / f"{_TEMPORARY}pruned-{old.name}-{os.getpid()}"
        shutil.rmtree(doomed, ignore_errors=True)  # (an earlier prune's leftover, same name)
        with removed_on_failure(doomed):  # (Ctrl-C mid-deletion: the rest is deleted too)
            try:
                os.replace(old, doomed)
            except OSError:  # (gone already, or not ours to move: left as it is)
                continue
            shutil.rmtree(doomed, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    found = checkpoint_dirs(checkpoint_root(output_dir))
    return found[-1] if found else None
