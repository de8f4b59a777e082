"""The safetensors header, read and checked without loading any tensor.

Layout: 8 bytes little-endian ``n``, then ``n`` bytes of JSON
``{"__metadata__": {str: str}, key: {"dtype", "shape", "data_offsets": [start, end]}, ...}``,
then the tensor bytes (offsets relative to the end of the header).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import AdapterFileError

__all__ = [
    "DTYPE_SIZES",
    "SafetensorsHeader",
    "TensorInfo",
    "header_length",
    "parse_header",
    "read_header",
    "serialize",
    "truncated",
    "unreadable",
]

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """What the header of one safetensors file says (``file_size`` in bytes)."""

    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_size: int = 0


def _broken(path: Path, what: str) -> AdapterFileError:
    return AdapterFileError(
        f"{path} is not a valid safetensors file: {what}. The file is truncated or corrupted; "
        "save the adapter again (or restore it from a copy)."
    )


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and check the header of ``path`` (reads ``8 + n`` bytes, not the tensors).

    Raises ``AdapterFileError`` if the header is malformed, the file is shorter than the
    tensors it declares, or it cannot be read (a directory, a symlink loop, no permission).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            length = header_length(path, prefix, file_size)
            raw = handle.read(length)
    except OSError as error:
        raise unreadable(path, error) from None
    return parse_header(path, raw, file_size)


def unreadable(path: Path, error: OSError) -> AdapterFileError:
    """The error for a file that cannot be opened or read (``error.strerror`` says why)."""
    reason = error.strerror or type(error).__name__
    text = str(path)
    shown = text if len(text) <= 300 else f"{text[:150]}...{text[-100:]}"
    return AdapterFileError(f"cannot read {shown}: {reason}. Check the path and its permissions.")


def header_length(path: Path, prefix: bytes, file_size: int) -> int:
    """The JSON length ``n`` from the first 8 bytes, checked against the file size."""
    if len(prefix) < 8:
        raise _broken(path, f"only {len(prefix)} bytes long")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > _MAX_HEADER_BYTES or 8 + length > file_size:
        raise _broken(path, f"header length {length} does not fit a {file_size}-byte file")
    return length


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """The header from its JSON bytes ``raw``; checks every entry, that no key is repeated and
    that the tensors tile the data area (``file_size - 8 - len(raw)`` bytes) exactly."""
    try:
        entries = json.loads(raw.decode("utf-8"), object_pairs_hook=_without_repeats)
    except _RepeatedKeyError as error:
        raise _broken(path, f"key {error.key!r} appears twice in the header") from None
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: JSON, or a 4300+ digit int
        raise _broken(path, f"header is not JSON ({error})") from None
    except RecursionError:
        raise _broken(path, "header JSON is nested too deeply") from None
    if not isinstance(entries, dict):
        raise _broken(path, "header is not a JSON object")
    metadata = entries.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise _broken(path, "__metadata__ is not an object of strings")
    header = SafetensorsHeader(metadata=metadata)
    header.file_size = file_size
    for key, entry in entries.items():
        header.tensors[key] = _tensor_info(path, key, entry)
    data_size = file_size - 8 - len(raw)
    end = max((info.end for info in header.tensors.values()), default=0)
    if end > data_size:
        raise truncated(path, end, data_size)
    _check_tiling(path, header.tensors, data_size)
    return header


class _RepeatedKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _without_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as a dict, refusing a repeated key (``json.loads`` keeps the last copy;
    safetensors refuses the file)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKeyError(key)
        seen.add(key)
    return dict(pairs)


def truncated(path: Path, needed: int, present: int) -> AdapterFileError:
    """The error for a file whose tensors need ``needed`` data bytes where it has ``present``."""
    return _broken(path, f"tensors need {needed} data bytes, the file has {present}")


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Safetensors' rule: sorted by ``(start, end)``, the first tensor starts at 0, each starts
    where the previous one ends, and the last ends at ``data_size`` (no byte is shared by two
    tensors, none is left over)."""
    covered, last = 0, None
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != covered:
            raise _broken(
                path,
                f"tensor {key!r} has data_offsets [{info.start}, {info.end}] but the previous "
                f"tensor ends at byte {covered}: data_offsets overlap or leave a gap",
            )
        covered, last = info.end, key
    if covered != data_size:
        after = f"the last tensor {last!r}" if last is not None else "the header"
        raise _broken(path, f"{data_size - covered} bytes after {after}")


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 4.0: safetensors' shapes are usize)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, key: str, entry: object) -> TensorInfo:
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError) as error:
        raise _broken(path, f"entry {key!r} is malformed (no {error})") from None
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _broken(path, f"tensor {key!r} has shape {shape!r}, not a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise _broken(path, f"tensor {key!r} has data_offsets {offsets!r}, not [start, end]")
    if not isinstance(dtype, str):
        raise _broken(path, f"tensor {key!r} has dtype {dtype!r}, not a string")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.dtype not in DTYPE_SIZES:
        raise _broken(path, f"tensor {key!r} has unknown dtype {info.dtype!r}")
    if info.end - info.start != info.numel * DTYPE_SIZES[info.dtype] or info.start < 0:
        raise _broken(path, f"tensor {key!r} offsets do not match its shape and dtype")
    return info


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a deterministic header: ``safetensors.torch.save`` orders the
    tensors (dtype, then key) but writes metadata entries in hash order, so the metadata is
    re-emitted here with sorted keys (same JSON encoding, header padded to 8 bytes). Keys are
    written as ``keys.written_key`` spells them (a DoRA magnitude with ``.weight``)."""
    from safetensors.torch import save

    from lorakit.io.keys import written_keys

    data = save(written_keys(tensors), metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    entries = json.loads(data[8 : 8 + length])
    entries["__metadata__"] = dict(sorted(entries.get("__metadata__", {}).items()))
    ordered = {"__metadata__": entries.pop("__metadata__"), **entries}
    header = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + length :]
