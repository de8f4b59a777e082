"""Whether an entry of the model cache (``lorakit.model_cache``) is usable: its marker
(``CONVERSION_MARKER``) names this conversion version, the source GGUF file (by name, and by
size when recorded) and every file's size; an entry from before sizes were recorded has its
weights files' safetensors headers checked against their sizes. A few ``stat`` calls, no
hashing. A directory without the marker is not lorakit's (``is_complete`` refuses it).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import UserError, first_line

__all__ = [
    "CONVERSION_MARKER",
    "CONVERSION_VERSION",
    "entry_problem",
    "error_gist",
    "is_complete",
]

CONVERSION_MARKER = "lorakit-conversion.json"
CONVERSION_VERSION = 1


def error_gist(error: BaseException) -> str:
    """The gist of an I/O error: ``strerror`` for an ``OSError``, else the first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return first_line(error, 200)


def is_complete(directory: Path, source: Path | None = None) -> bool:
    """Whether ``directory`` is a usable converted entry: False when it is absent, or when it is
    damaged or stale (``entry_problem``; converted again). A directory without the marker is not
    lorakit's (or half-written by hand): ``UserError`` saying to delete it."""
    if not directory.exists():
        return False
    if not (directory / CONVERSION_MARKER).is_file():
        raise UserError(
            f"model cache '{directory}' is incomplete or not made by lorakit; delete it and retry"
        )
    return entry_problem(directory, source) is None


def entry_problem(directory: Path, source: Path | None = None) -> str | None:
    """What is wrong with the converted entry ``directory`` (it has its marker), or None.

    Checked: the marker's ``version`` is ``CONVERSION_VERSION``; its ``source`` name (and
    ``source_size``, when both are recorded) match the GGUF file ``source``; every file it lists
    has the recorded size (a few ``stat`` calls, no hashing). An entry from before sizes were
    recorded gets the weights file's safetensors header checked against its size instead.
    """
    try:
        marker = json.loads((directory / CONVERSION_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"unreadable {CONVERSION_MARKER} ({error_gist(error)})"
    if not isinstance(marker, dict) or marker.get("version") != CONVERSION_VERSION:
        version = marker.get("version") if isinstance(marker, dict) else None
        return f"conversion version {version!r}, not {CONVERSION_VERSION}"
    source_problem = _source_problem(marker, source)
    if source_problem is not None:
        return source_problem
    files = marker.get("files")
    if not isinstance(files, dict):
        return _legacy_entry_problem(directory)
    for name, size in files.items():
        path = directory / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            return f"{name} is {found}, not the {size} bytes written"
    return None


def _source_problem(marker: dict, source: Path | None) -> str | None:
    """A marker whose source GGUF is not ``source`` (by name, and by size when recorded)."""
    if source is None:
        return None
    if marker.get("source") not in (None, source.name):
        return f"converted from {marker.get('source')!r}, not {source.name!r}"
    recorded = marker.get("source_size")
    if recorded is not None and source.is_file() and source.stat().st_size != recorded:
        return f"converted from a {recorded}-byte {source.name}, now {source.stat().st_size} bytes"
    return None


def _legacy_entry_problem(directory: Path) -> str | None:
    """An entry converted before file sizes were recorded: ``config.json`` is there and each
    ``*.safetensors`` file is as long as its header says (catches a truncated weights file)."""
    if not (directory / "config.json").is_file():
        return "config.json is missing"
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_size))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (OSError, ValueError, TypeError, KeyError, IndexError, MemoryError):
            return f"{path.name} has a damaged header"
        if path.stat().st_size != 8 + header_size + max(ends, default=0):
            return f"{path.name} is {path.stat().st_size} bytes, not what its header says"
    return None
