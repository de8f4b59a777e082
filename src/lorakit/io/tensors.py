"""Read every tensor of a safetensors file with one read, and check their values in bulk.

An adapter file holds hundreds of small tensors, and building them one by one (safetensors'
``load_file`` maps the file and makes each tensor in turn) costs more than moving the bytes.
Here the header is read and checked first (``parse_header``: the tensors must tile the data area
exactly, so a file with bytes after the last tensor is refused before any data is read), then the
data area is read into one buffer with a single ``readinto``; every tensor starts as a view of it
and is then cloned into storage of its own (tensors that share one storage are refused, or
silently dropped as "tied", by safetensors' and transformers' savers).

Values are checked once per dtype over the bytes that dtype's tensors span: the minimum and
maximum of the span (one pass; a NaN propagates) within +-``MAX_ABS_VALUE`` prove every tensor
finite and in range. Otherwise (a bad value, or the bytes of another dtype's tensor lying in
between) that dtype's tensors are checked one by one. ``MAX_ABS_VALUE`` is float16's largest
value, 65504: a LoRA factor, bias or saved weight beyond it is a broken file (a diverged run, or
bytes that are not what they claim), and no float16 model could use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.io.header import (
    DTYPE_SIZES,
    SafetensorsHeader,
    header_length,
    parse_header,
    truncated,
    unreadable,
)

__all__ = ["MAX_ABS_VALUE", "TORCH_DTYPES", "SafetensorsFile", "read_safetensors", "unwritable"]

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
assert set(TORCH_DTYPES) == set(DTYPE_SIZES)
MAX_ABS_VALUE = 65504.0  # float16's largest finite value


@dataclass
class SafetensorsFile:
    """A safetensors file in memory: ``tensors`` (key -> tensor with its own storage, the file's
    dtype), ``nonfinite`` (keys of floating-point tensors holding inf or NaN) and ``huge`` (keys
    of those holding finite values beyond +-``MAX_ABS_VALUE``)."""

    header: SafetensorsHeader
    tensors: dict[str, torch.Tensor]
    nonfinite: frozenset[str]
    huge: frozenset[str] = frozenset()


def read_safetensors(path: str | Path) -> SafetensorsFile:
    """Read and check ``path`` (raises ``AdapterFileError`` for a truncated or malformed file).

    Reads the header, checks it (``parse_header``), then exactly the data bytes it declares."""
    path = Path(path)
    try:
        header, buffer = _read_checked(path)
    except OSError as error:
        raise unreadable(path, error) from None
    views = {key: _view(buffer, info) for key, info in header.tensors.items()}
    nonfinite, huge = _bad_values(buffer, header, views)
    tensors = {key: view.clone() for key, view in views.items()}
    return SafetensorsFile(header, tensors, nonfinite, huge)


def _read_checked(path: Path) -> tuple[SafetensorsHeader, torch.Tensor]:
    """The checked header of ``path`` and its data area (the bytes after the header, as many as
    the tensors declare: ``parse_header`` refuses a file with more) in one uint8 buffer."""
    with path.open("rb", buffering=0) as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        raw = handle.read(header_length(path, prefix, file_size))
        header = parse_header(path, raw, file_size)
        data_size = max((info.end for info in header.tensors.values()), default=0)
        buffer = torch.empty(data_size, dtype=torch.uint8)
        target = memoryview(buffer.numpy())
        done = 0
        while done < data_size:
            count = handle.readinto(target[done:])
            if not count:
                raise truncated(path, data_size, done)  # the file shrank while being read
            done += count
    return header, buffer


def _view(buffer: torch.Tensor, info) -> torch.Tensor:
    """The bytes of one tensor as that tensor (a view where the offset is aligned)."""
    raw = buffer[info.start : info.end]
    if info.start % DTYPE_SIZES[info.dtype]:
        raw = raw.clone()  # a misaligned tensor (not written by safetensors): copy to align
    return raw.view(TORCH_DTYPES[info.dtype]).view(info.shape)


def _bad_values(
    buffer: torch.Tensor, header: SafetensorsHeader, views: dict
) -> tuple[frozenset[str], frozenset[str]]:
    """Keys of the floating-point tensors holding inf/NaN, and of those holding finite values
    beyond ``MAX_ABS_VALUE`` (see the module docstring for the bulk check)."""
    nonfinite: set[str] = set()
    huge: set[str] = set()
    by_dtype: dict[str, list[str]] = {}
    for key, info in header.tensors.items():
        if views[key].is_floating_point() and info.end > info.start:
            by_dtype.setdefault(info.dtype, []).append(key)
    for dtype, keys in by_dtype.items():
        start = min(header.tensors[k].start for k in keys)
        end = max(header.tensors[k].end for k in keys)
        size = DTYPE_SIZES[dtype]
        if start % size == 0 and (end - start) % size == 0:
            span = buffer[start:end].view(TORCH_DTYPES[dtype])
            if _within_range(_checkable(span)):
                continue
        for key in keys:
            values = _checkable(views[key])
            if not bool(torch.isfinite(values).all()):
                nonfinite.add(key)
            elif not _within_range(values):
                huge.add(key)
    return frozenset(nonfinite), frozenset(huge)


def unwritable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds a value no adapter file may hold (inf/NaN, or beyond
    +-``MAX_ABS_VALUE``): the rule ``read_safetensors`` applies to every file, for writers that
    must not produce a file no reader takes (``combine``, the server's mixtures). Non-float
    and empty tensors hold none."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    return not _within_range(_checkable(tensor))


def _within_range(values: torch.Tensor) -> bool:
    """Every value finite and within +-``MAX_ABS_VALUE`` (a NaN fails both comparisons)."""
    low, high = torch.aminmax(values)
    return bool(low >= -MAX_ABS_VALUE) and bool(high <= MAX_ABS_VALUE)


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype ``torch.isfinite`` takes (float8 widened; exact, as is the rest)."""
    return tensor.float() if tensor.element_size() == 1 else tensor
