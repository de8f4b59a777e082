"""The adapters a server may serve: names -> PEFT directories inside one root directory.

Every subdirectory of ``root`` holding an ``adapter_config.json`` is an adapter named after it.
Names follow ``valid_name`` (``serve/adapter_names.py``) at start-up (another directory name is
skipped, with the reason in ``skipped``) and on runtime loads (``register``), whose paths must stay
inside ``root`` once resolved (no ``..``, no absolute paths). A subdirectory created after start-up
is registered at the first request that names it (``discover``), unless an admin unloaded that name
(``unregister(withdrawn=True)``) and no runtime load brought it back. Paths are kept as given
(``root/name``), so a symlink inside ``root`` is followed on every read (re-pointing it replaces
the adapter). No symlinks out: a directory, or an adapter file in it, that resolves outside
``root`` is refused, at start-up (skipped with a warning), on a runtime load and on every read,
without telling the client where it leads. ``read_headers`` is the start-up scan: configs and
safetensors headers only, broken adapters skipped and reported. ``file_identity``: what changes
when an adapter's files are replaced.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from lorakit.errors import UserError
from lorakit.io.config_json import CONFIG_NAME
from lorakit.io.read import (
    PICKLE_NAME,
    WEIGHTS_NAME,
    AdapterHeader,
    read_adapter_header,
    refuse_residual_base_factors,
)
from lorakit.serve.adapter_names import NAME_RULE, AdapterNameError, bad_directory_name, valid_name

__all__ = [
    "AdapterGoneError",
    "AdapterNameError",
    "AdapterRegistry",
    "BrokenAdapterError",
    "file_identity",
    "some_names",
    "valid_name",
]

log = logging.getLogger(__name__)

SHOWN_NAMES = 10  # adapter names an error message lists at most (``some_names``)
SERVING = "serving it on the server's shared, unchanged base model"
"""What serving a PiSSA / OLoRA file's factors would do (``refuse_residual_base_factors``)."""


class AdapterGoneError(KeyError):
    """A served adapter whose directory was deleted (``ServedAdapters.drop_if_deleted``): it
    left the registry; ``returns``: it is found again (``AdapterRegistry.discover``) once its
    directory, ``root/name``, is back (else only a runtime load brings the name back)."""

    def __init__(self, name: str, returns: bool) -> None:
        super().__init__(name)
        self.returns = returns


class BrokenAdapterError(UserError):
    """A subdirectory ``root/name`` with an ``adapter_config.json`` that cannot be served
    (``AdapterRegistry.discover``); the message names it and says why and what to do (paths
    relative to ``root``). It is read again once its files change."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"the adapter directory {name!r} cannot be served: {reason}")


class AdapterRegistry:
    """Thread-safe ``{name: directory}`` under ``root``, seeded from the root's subdirectories."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise UserError(
                f"adapter directory {root} does not exist; create it or pass another --adapters."
            )
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._reserved: set[str] = set()
        self._withdrawn: set[str] = set()  # unloaded by an admin: not discovered again
        self._broken: dict[str, tuple[list, str]] = {}  # name -> (file_identity, why): discover
        self.skipped: dict[str, str] = {}  # name -> why it is not served (start-up scan)
        for child in sorted(self.root.iterdir()):
            try:
                if not (child / CONFIG_NAME).is_file():
                    continue
                if not valid_name(child.name):
                    raise UserError(bad_directory_name(child.name))
                self.inside(child, str(child))
                self._paths[child.name] = child  # (a link inside is followed on every read)
            except OSError:
                continue  # not an adapter directory we can look into (a name too long, ...)
            except UserError as error:
                self._skip(child.name, str(error))

    def discover(self, name: object) -> bool:
        """Whether ``name`` is served: registered, or a subdirectory ``root/name`` holding an
        adapter (one created, or created again, after start-up), which is then registered as
        the start-up scan would have; not a name an admin unloaded (until a runtime load).
        ``BrokenAdapterError`` (the reason) for a directory holding an ``adapter_config.json``
        that fails the scan's checks: logged once, and not read again while its files stay
        the same (``file_identity``)."""
        with self._lock:
            if name in self._paths:
                return True
            if name in self._reserved or name in self._withdrawn or not valid_name(name):
                return False
        directory = self.root / name
        try:
            if not (directory / CONFIG_NAME).is_file():
                return False
        except OSError:  # (a name too long for the file system)
            return False
        identity = file_identity(directory)
        with self._lock:
            known = self._broken.get(name)
        if known is not None and known[0] == identity:  # unchanged since: not read again
            raise BrokenAdapterError(name, known[1])
        try:
            header = read_adapter_header(self.inside(directory, name))
            refuse_residual_base_factors(header, SERVING, fingerprint_checked=True)
        except (OSError, UserError) as error:  # (the start-up scan's checks: read_headers)
            reason = self.relative(str(error))
            log.warning("not serving adapter %r: %s", name, reason)
            with self._lock:
                self._broken[name] = (identity, reason)
            raise BrokenAdapterError(name, reason) from None
        with self._lock:
            self._broken.pop(name, None)
            self._paths.setdefault(name, directory)
        log.info("adapter %r found in %s and registered", name, self.root)
        return True

    def relative(self, text: str) -> str:
        """``text`` with the paths inside ``root`` written relative to it (``root`` itself as
        ``.``): the messages sent to HTTP clients never show the server's directories."""
        root = str(self.root)
        return text.replace(root + os.sep, "").replace(root, ".")

    def _skip(self, name: str, reason: str) -> None:
        log.warning("not serving adapter %r: %s", name, reason)
        self.skipped[name] = reason

    def inside(self, directory: Path, shown: str) -> Path:
        """``directory`` resolved; ``UserError`` when it, or one of its adapter files, resolves
        outside ``root`` (a symlink out) or cannot be resolved (a loop, a name too long)."""
        try:
            resolved = directory.resolve()
            files = [
                (resolved / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)
            ]
            found = [path for path in (resolved, *files) if path == resolved or path.exists()]
        except (
            OSError,
            RuntimeError,
            ValueError,
        ) as error:  # a loop (RuntimeError before 3.13), a NUL
            reason = getattr(error, "strerror", None) or error  # no 5000-character file names
            raise UserError(f"{shown} cannot be resolved ({reason}).") from None
        for path in found:
            if not path.is_relative_to(self.root):  # (where to: in the server's log only)
                log.warning("adapter %s leads outside %s, to %s", shown, self.root, path)
                raise UserError(
                    f"{shown} leads outside the adapter directory through a symlink; copy the "
                    "adapter into the adapter directory instead."
                )
        return resolved

    def read_headers(self) -> dict[str, AdapterHeader]:
        """The config and safetensors header of every registered adapter (no tensor data);
        an adapter that cannot be read is skipped: unregistered, logged and kept in
        ``skipped`` with the reason."""
        headers = {}
        for name in self.names():
            try:
                header = read_adapter_header(self.inside(self.path(name), name))
                refuse_residual_base_factors(header, SERVING, fingerprint_checked=True)
                headers[name] = header
            except UserError as error:
                self.unregister(name)
                self._skip(name, str(error))
        return headers

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._paths

    def path(self, name: str) -> Path:
        with self._lock:
            if name not in self._paths:
                raise KeyError(f"unknown adapter {name!r}; known: {some_names(self._paths)}")
            return self._paths[name]

    def reserve(self, name: str) -> None:
        """Refuse ``name`` as an adapter name from now on (the base model's id: requests for it
        get the base, so an adapter under it could never be reached). ``UserError`` when an
        adapter subdirectory already has it."""
        with self._lock:
            if name in self._paths:
                raise UserError(
                    f"the adapter {self._paths[name]} has the base model's name {name!r}; "
                    "rename its directory or give the base another id (--served-model-name)."
                )
            self._reserved.add(name)

    def check_name(self, name: object) -> str:
        if not valid_name(name):
            raise AdapterNameError(f"adapter name {name!r} is invalid: use {NAME_RULE}.")
        with self._lock:
            if name in self._reserved:
                raise AdapterNameError(
                    f"adapter name {name!r} is the base model's name (requests for it get the "
                    "base model); choose another name."
                )
        return name

    def resolve(self, name: str, relative_path: str | None) -> Path:
        """The directory for a runtime load: ``root/relative_path`` (default ``root/name``),
        refused unless it stays inside ``root``."""
        self.check_name(name)
        relative_path = name if relative_path is None else relative_path
        if not isinstance(relative_path, str) or not relative_path:
            raise UserError("lora_path must be a non-empty path relative to the adapter directory.")
        candidate = Path(relative_path)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise UserError(
                f"lora_path {relative_path!r} is not allowed: give a path relative to the adapter "
                "directory, without '..'."
            )
        shown = f"lora_path {relative_path[:200]!r}"
        resolved = self.inside(self.root / candidate, shown)
        try:
            has_config = (resolved / CONFIG_NAME).is_file()
        except (OSError, ValueError) as error:  # e.g. a name too long for the file system
            raise UserError(
                f"{shown} cannot be read ({getattr(error, 'strerror', None) or error})."
            ) from None
        if not has_config:
            raise UserError(f"{shown} holds no {CONFIG_NAME}.")
        return self.root / candidate  # (a link inside is followed on every read)

    def register(self, name: str, path: Path) -> bool:
        """Serve ``root``'s directory ``path`` as ``name`` (a runtime load); ``ValueError`` when
        ``name`` is registered. Returns whether ``name`` was withdrawn before, for a caller that
        undoes the registration: ``unregister(name, withdrawn=<that>)``."""
        self.check_name(name)
        with self._lock:
            if name in self._paths:
                raise ValueError(f"adapter {name!r} is already loaded; unload it first.")
            self._paths[name] = path
            withdrawn = name in self._withdrawn
            self._withdrawn.discard(name)
        return withdrawn

    def unregister(self, name: str, withdrawn: bool = False) -> None:
        """Forget ``name``. ``withdrawn`` (an admin's unload): ``discover`` does not bring it
        back from its directory; only a runtime load (``register``) does."""
        with self._lock:
            if name not in self._paths:
                raise KeyError(f"unknown adapter {name!r}")
            del self._paths[name]
            if withdrawn:
                self._withdrawn.add(name)


def some_names(names) -> str:
    """``names`` sorted for a message: the first ``SHOWN_NAMES``, then how many more (a server
    may serve thousands: review 38's 404 listed 3,844 characters of them)."""
    names = sorted(names)
    more = len(names) - SHOWN_NAMES
    listed = str(names[:SHOWN_NAMES])
    return listed if more <= 0 else f"{listed} and {more} more; GET /v1/models lists them"


def file_identity(directory: Path) -> list[object]:
    """``[directory, size, mtime, inode and ctime of the config, the same of the weights]`` of
    an adapter directory (None for a missing file): what changes when its files are replaced,
    also by a copy of the same size that keeps the old mtime (``cp -p``, ``rsync -a``: the
    ctime still moves, and a new file has a new inode)."""
    stamps: list[object] = [str(directory)]
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            found = (directory / file_name).stat()
            stamps += [found.st_size, found.st_mtime_ns, found.st_ino, found.st_ctime_ns]
        except OSError:
            stamps += [None, None, None, None]
    return stamps
