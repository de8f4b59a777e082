"""Rename a set of staged files in (an adapter's weights, then its ``adapter_config.json``), and
put the old set back when a rename fails.

``rename_set_in(staged)``, for ``atomic.write_files``: the LAST target's old file is moved aside
first (a crash between the renames then leaves no ``adapter_config.json``, never a new file
beside an old one read as a pair), each other target's old file is kept under a hidden
``.<name>.<hex>.tmp`` name (a hard link: no data copied; a copy where the file system has no
hard links), and the new files are renamed in, the last one last. An error at any rename puts
every old file back (the old set stays whole, byte for byte) and is raised as it was (a kill,
``BaseException``, leaves the files as a crash would: no ``adapter_config.json``). Where
that cannot be done (no copy of an old file could be kept, or putting one back fails too), the
error says what each file of the directory now is and which hidden file holds each old one,
so that renaming them back by hand restores the old set. The kept copies are removed after a
save that succeeded (after a crash: by the next save, as stale ``.*.tmp`` files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorakit.io.atomic import _create_new_file, _move_aside

__all__ = ["rename_set_in"]


@dataclass
class _Old:
    """One target during the renames: ``kept`` is where its old file is kept (None: it had
    none, or no copy could be kept: ``existed`` tells), ``replaced`` whether the new file is
    in place."""

    target: Path
    kept: str | None
    existed: bool
    replaced: bool = False


def rename_set_in(staged: list[tuple[str, Path]]) -> None:
    """Rename each staged ``(temporary, target)`` over its target, the last one last (see the
    module docstring), with Ctrl-C held back; on an error the old files are put back
    (``_put_back``) and the error raised, with the directory's state where that failed."""
    from lorakit.base_rewrite import interrupts_held

    *first, (last_temporary, last) = staged
    with interrupts_held():
        aside = _move_aside(last)  # (an error here: nothing changed)
        olds = [_Old(last, aside, aside is not None)]
        try:
            for temporary, target in first:
                olds.append(_kept(target))
                os.replace(temporary, target)
                olds[-1].replaced = True
            os.replace(last_temporary, last)
        except Exception as error:  # (not a kill: that leaves the files as a crash does)
            problems = _put_back(olds)
            if problems and isinstance(error, OSError):
                raise _state_error(error, last.parent, problems) from error
            raise
        for old in olds:
            if old.kept is not None:
                with contextlib.suppress(OSError):
                    os.unlink(old.kept)


def _kept(target: Path) -> _Old:
    """``target``'s old file kept under a new hidden name beside it: a hard link, else a copy;
    ``kept=None`` when there is no old file or neither can be made."""
    if not os.path.lexists(target):
        return _Old(target, None, existed=False)
    fd, kept = _create_new_file(target.parent, f".{target.name}.")
    os.close(fd)
    try:
        os.unlink(kept)  # (the name, now free, for the link)
        os.link(target, kept, follow_symlinks=False)  # (a link is kept as a link)
    except OSError:  # (no hard links here: FAT, some network file systems)
        try:
            shutil.copyfile(target, kept, follow_symlinks=False)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(kept)
            return _Old(target, None, existed=True)
    return _Old(target, kept, existed=True)


def _put_back(olds: list[_Old]) -> list[str]:
    """Put every old file back in place (the new ones out); the lines saying what each target
    is now where that failed (none: the old set is whole again)."""
    problems = []
    for old in olds:
        if old is not olds[0] and not old.replaced:  # (its old file is still in place)
            with contextlib.suppress(OSError):
                if old.kept is not None:
                    os.unlink(old.kept)
            continue
        now = "the new file" if old.replaced else "missing"  # (the last: moved aside)
        try:
            if old.kept is not None:
                os.replace(old.kept, old.target)
            elif not old.existed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old.target)
            else:
                problems.append(f"{old.target.name} is {now}; its old one is lost (no copy)")
        except OSError as error:
            problems.append(
                f"{old.target.name} is {now} ({error.strerror}); its old one is {old.kept}"
            )
    return problems


def _state_error(error: OSError, directory: Path, problems: list[str]) -> OSError:
    """``error`` with the directory's state after a failed put-back in its ``strerror`` (what
    ``save_errors.save_failure`` shows) and what to rename to get the old set back."""
    reason = (
        f"{error.strerror or error}; putting the old files back failed too, so {directory} "
        f"now holds: {'; '.join(problems)}. Rename each old one back over its name to get the "
        "old adapter back, or save again"
    )
    return OSError(error.errno, reason)
