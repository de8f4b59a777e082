"""One save at a time per output directory: an advisory lock (POSIX ``flock``) on the file
``.lorakit-save.lock`` in it, held while a save stages and renames its files. Two processes
saving into one directory then take turns, and the last save wins whole (never one save's
weights beside the other's ``adapter_config.json``).

The lock file is removed by the holder when it is done (peft and transformers would ignore it
anyway: neither reads hidden files). A waiter that finds the file it locked removed meanwhile
locks the new one: the lock is always on the file the path names. Where there is no ``fcntl``
(Windows) or the file system refuses ``flock`` (some network file systems), saves run
unlocked, each still atomic file by file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "directory_locked"]

LOCK_NAME = ".lorakit-save.lock"

# What a file system without flock answers (NFS without a lock daemon, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


@contextlib.contextmanager
def directory_locked(directory: str | os.PathLike[str]) -> Iterator[bool]:
    """Hold the save lock of ``directory`` (which must exist) for the block, waiting for another
    process's save to end first; yields whether a lock is held (False: no ``flock`` here).
    Raises the ``OSError`` of a directory where the lock file cannot be made (read-only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    path = Path(directory) / LOCK_NAME
    fd = _locked(path, fcntl)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        try:
            os.unlink(path)  # (still held: a waiter on this file sees it gone and retries)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock


def _locked(path: Path, fcntl) -> int | None:
    """A descriptor of the lock file at ``path``, locked, and still the file at ``path`` (a
    holder removes it when done, so the one a waiter locked may be gone); None where the file
    system refuses ``flock`` (the file made for it removed again)."""
    flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, os.fstat(fd)):
                return fd
        except OSError as error:
            os.close(fd)
            if error.errno not in _NO_LOCKS:
                raise
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        except BaseException:  # (Ctrl-C while waiting)
            os.close(fd)
            raise
        os.close(fd)


def _names(path: Path, locked: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``locked`` describes."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino)
