"""Atomic file writes: a temporary file in the target directory, fsync, then ``os.replace``.

A reader (or a crash at any moment) sees either the old file or the complete new one, never a
partial file. A crash may leave a ``.<name>.*.tmp`` file behind; the next save removes those.
Files get the permissions of any new file (``0666 & ~umask``), not ``mkstemp``'s 0600, so other
users or a serving container can read them where the umask allows. A save the file system
refuses is reported as a ``SaveError`` naming the output directory (``save_failure``, from
``lorakit.io.save_errors``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from lorakit.io.save_errors import SaveError, check_output_directory, save_failure
from lorakit.io.save_lock import directory_locked

__all__ = [
    "STALE_AFTER_S",
    "SaveError",
    "check_output_directory",
    "is_stale",
    "new_file_mode",
    "save_failure",
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
    """Replace a set of files of one directory that belong together (an adapter's weights, then
    its ``adapter_config.json``): every new file is written and fsynced under a temporary name
    first, then all are renamed in, in the order given (``_rename_in``).

    Each file is replaced atomically; the set cannot be (POSIX has no multi-file rename). The
    LAST file is the one that makes the set readable (without ``adapter_config.json`` PEFT
    refuses the directory; lorakit reads the config kept in the weights, with a warning): its old version is moved out before the first rename and the
    new one comes last, so a crash between the renames (milliseconds on some file systems)
    leaves the set without it, never a new file beside an old one that would be read as a pair.
    Ctrl-C is held back over the renames. Two processes writing one directory take turns
    (``save_lock``): the last one's set wins whole.
    """
    several = len(files) > 1
    with directory_locked(Path(next(iter(files))).parent) if several else contextlib.nullcontext():
        staged: list[tuple[str, Path]] = []
        try:
            for path, data in files.items():
                target = Path(path)
                _remove_stale_temporaries(target)
                staged.append((_write_temporary(target, data), target))
            _rename_in(staged)
        except BaseException:
            for temporary, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            raise
    for directory in {target.parent for _, target in staged}:
        sync_directory(directory)


def _rename_in(staged: list[tuple[str, Path]]) -> None:
    """Rename each staged ``(temporary, target)`` over its target. For several files,
    ``rename_set.rename_set_in``: the last target's old file moved aside, the others renamed
    in, then the last one, with Ctrl-C held back; an error at any rename puts every old file
    back (or says which hidden file holds each)."""
    if len(staged) == 1:
        os.replace(*staged[0])
        return
    from lorakit.io.rename_set import rename_set_in

    rename_set_in(staged)


def _move_aside(target: Path) -> str | None:
    """Rename ``target`` to a new temporary name beside it and fsync the directory (so the
    removal reaches the disk before the renames that follow); that name, or None when there is
    no ``target``. A directory in its place is refused (``IsADirectoryError``), untouched."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    fd, aside = _create_new_file(target.parent, f".{target.name}.")
    os.close(fd)
    try:
        os.replace(target, aside)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise
    sync_directory(target.parent)
    return aside


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
