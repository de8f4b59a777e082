"""Atomic file writes: a temporary file in the target directory, fsync, then ``os.replace``.

A reader (or a crash at any moment) sees either the old file or the complete new one, never a
partial file. A crash may leave a ``.<name>.*.tmp`` file behind; the next save removes those.
Files get the permissions of any new file (``0666 & ~umask``), not ``mkstemp``'s 0600, so other
users or a serving container can read them where the umask allows.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "STALE_AFTER_S",
    "is_stale",
    "new_file_mode",
    "sync",
    "sync_directory",
    "write_bytes",
    "write_files",
    "write_text",
    "write_with",
]

# A temporary file (or staging folder) untouched for this long is a killed writer's: a live one
# keeps writing into it. The next save beside it removes it.
STALE_AFTER_S = 60


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (the directory must exist)."""
    write_files({path: data})


def write_files(files: dict[str | os.PathLike[str], bytes]) -> None:
    """Replace several files of one directory: every new file is written and fsynced under a
    temporary name first, then all are renamed in one burst (in the order given).

    Each file is replaced atomically. The set is not (POSIX has no multi-file rename): a crash
    can only fall between two renames, microseconds apart, never while data is written.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            target = Path(path)
            _remove_stale_temporaries(target)
            staged.append((_write_temporary(target, data), target))
        for temporary, target in staged:
            os.replace(temporary, target)
    except BaseException:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise
    for directory in {target.parent for _, target in staged}:
        sync_directory(directory)


def write_with(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Replace ``path`` atomically with the file that ``write(temporary_path)`` writes, for
    writers that open a path themselves (``gguf.GGUFWriter``): the temporary file is fsynced,
    renamed into place and the directory fsynced, as ``write_files`` does; a failed or
    interrupted ``write`` leaves no temporary file (a killed one's is removed by the next)."""
    target = Path(path)
    _remove_stale_temporaries(target)
    fd, temporary = _create_new_file(target.parent, f".{target.name}.")
    os.close(fd)
    try:
        write(temporary)
        sync(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_directory(target.parent)


def sync(path: str | os.PathLike[str]) -> None:
    """fsync a file written by someone else's writer (its data reaches the disk before it is
    renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_new_file(directory: Path, prefix: str) -> tuple[int, str]:
    """``(fd, path)`` of a new file ``<prefix><random>.tmp`` in ``directory``, opened for writing,
    created with mode 0666 so that the umask (and any default ACL) applies as to any new file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def new_file_mode(directory: str | os.PathLike[str]) -> int:
    """The permission bits a new file in ``directory`` gets (``0666 & ~umask`` without default
    ACLs), found by creating one: reading the umask would change it for every thread."""
    fd, probe = _create_new_file(Path(directory), ".mode-probe.")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _write_temporary(target: Path, data: bytes) -> str:
    fd, temporary = _create_new_file(target.parent, f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of ``target`` left by a killed writer (older than a minute)."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if is_stale(leftover):
                leftover.unlink()


def is_stale(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` and, for a folder, every entry in it were last modified more than
    ``STALE_AFTER_S`` ago: a killed writer's leftover, not one a live writer is still filling
    (a folder's own mtime changes only when entries come and go, not while a file in it grows).
    A path that vanishes meanwhile is not stale (someone else is cleaning it)."""
    oldest_allowed = time.time() - STALE_AFTER_S
    try:
        times = [os.lstat(path).st_mtime]
        if os.path.isdir(path) and not os.path.islink(path):
            with os.scandir(path) as entries:
                times += [entry.stat(follow_symlinks=False).st_mtime for entry in entries]
    except OSError:
        return False
    return max(times) < oldest_allowed


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """fsync ``directory`` so that the renames and removals in it so far reach the disk before
    the next ones (nothing on a file system that cannot fsync a directory)."""
    with contextlib.suppress(OSError):  # (a file system that cannot fsync a directory)
        sync(directory)
