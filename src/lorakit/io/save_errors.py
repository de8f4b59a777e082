"""Saves the file system refuses: ``SaveError`` naming the output directory and the way out.

``save_failure`` turns an ``OSError`` (or safetensors' I/O error) of a save into a
``SaveError``; ``check_output_directory`` refuses, before anything is written, an output
directory that cannot be one. (``lorakit.io.atomic`` re-exports the three.)
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from lorakit.errors import UserError

__all__ = ["SaveError", "check_output_directory", "save_failure"]


class SaveError(UserError, OSError):
    """A save the file system refused (a full disk, a read-only or foreign path, a file where
    the directory should be): a ``UserError`` whose text names the output directory and what
    to do, and still an ``OSError`` with the ``errno`` / ``strerror`` it had, so that code
    catching ``OSError`` around a save keeps working."""

    def __init__(self, message: str, number: int | None, reason: str, directory: str) -> None:
        super().__init__(number, reason, directory)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # (pickled with its message: a worker process's error)
        return type(self), (self.message, self.errno, self.strerror, self.filename)


_REMEDIES = {
    errno.ENOSPC: "free space on its disk and save again",
    errno.EDQUOT: "free space (over the disk quota) and save again",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or free space, and save again",
    errno.EROFS: "its file system is read-only: save to another directory",
    errno.EACCES: "check its permissions, or save to another directory",
    errno.EPERM: "check its permissions and immutable flags (lsattr), or save to another directory",
}
# safetensors' own report of a failed write: "Error while serializing: I/O error: <strerror>
# (os error <errno>)".
_SAFETENSORS_IO = re.compile(r"I/O error: (.*?)(?: \(os error (\d+)\))?$")


def save_failure(error: BaseException, directory: Path, what: str) -> SaveError:
    """``error`` (an ``OSError``, or safetensors' I/O error) of saving ``what`` ("the adapter")
    into ``directory`` as a ``SaveError``: the directory, what the file system said, the file
    concerned where it is not a temporary one of the save (a directory named
    ``adapter_config.json``, say), and the way out."""
    if isinstance(error, SaveError):
        return error
    number, reason = getattr(error, "errno", None), getattr(error, "strerror", None)
    found = _SAFETENSORS_IO.search(str(error)) if not isinstance(error, OSError) else None
    if found is not None:
        reason, number = found[1], int(found[2]) if found[2] else None
    reason = reason or str(error) or type(error).__name__
    concerned = getattr(error, "filename2", None) or getattr(error, "filename", None)
    if isinstance(concerned, (str, os.PathLike)) and not _ours(Path(concerned), directory):
        reason = f"{reason}: {os.fspath(concerned)}"
    remedy = _REMEDIES.get(number, "fix the path, or save to another directory")
    message = f"cannot save {what} in {directory}: {reason}; {remedy}"
    return SaveError(message, number, reason, str(directory))


def _ours(path: Path, directory: Path) -> bool:
    """``path`` is ``directory``, or lies in it under a hidden name of the save's (a temporary,
    the lock, a staging folder and what is in it): not a file worth naming."""
    if path == directory:
        return True
    try:
        first = path.relative_to(directory).parts[0]
    except (ValueError, IndexError):
        return False
    return first.startswith(".")


def check_output_directory(directory: Path, what: str, *, writable: bool = False) -> None:
    """Refuse (``SaveError``, nothing written) an output ``directory`` that cannot be one: a
    file, a broken symbolic link, or a path below a file; with ``writable``, also one whose
    nearest existing folder cannot be written (read-only file system, permissions), for a save
    that changes the model before it writes (``save_merged_model`` merges first)."""
    try:
        existing = next((path for path in (directory, *directory.parents) if _present(path)), None)
    except OSError as error:
        raise save_failure(error, directory, what) from None
    if existing is None:  # (a relative path whose working directory is gone)
        return
    if not existing.is_dir():
        kind = "a broken symbolic link" if not existing.exists() else "a file"
        where = "" if existing == directory else f" ({existing} is {kind})"
        raise SaveError(
            f"cannot save {what} in {directory}{where or f': it is {kind}'}; give a directory "
            "(new or existing)",
            errno.ENOTDIR,
            os.strerror(errno.ENOTDIR),
            str(directory),
        )
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        number = errno.EROFS if _read_only(existing) else errno.EACCES
        refusal = OSError(number, os.strerror(number), str(existing))
        raise save_failure(refusal, directory, what)


def _present(path: Path) -> bool:
    """Whether something (a broken symbolic link too) is at ``path``."""
    return path.is_symlink() or path.exists()


def _read_only(directory: Path) -> bool:
    statvfs = getattr(os, "statvfs", None)  # (not on Windows)
    return statvfs is not None and bool(statvfs(directory).f_flag & os.ST_RDONLY)
