"""Read every tensor of a safetensors file with one read, and check their values in bulk.

An adapter file holds hundreds of small tensors, and building them one by one (safetensors'
``load_file`` maps the file and makes each tensor in turn) costs more than moving the bytes.
Here the file is read into one buffer with a single ``readinto``; every tensor starts as a view
of it and is then cloned into storage of its own (tensors that share one storage are refused, or
silently dropped as "tied", by safetensors' and transformers' savers).

Finite values are checked once per dtype over the bytes that dtype's tensors span: a float sum
is finite only if every term is (a NaN or an infinity propagates), so a finite sum proves every
tensor finite in one pass. A sum that is not finite (a bad value, an overflow, or the bytes of
another dtype's tensor lying in between) sends that dtype's tensors to an exact check one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.io.header import DTYPE_SIZES, SafetensorsHeader, header_length, parse_header

__all__ = ["TORCH_DTYPES", "SafetensorsFile", "read_safetensors"]

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
_SUMMABLE = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float32,
    "BF16": torch.float32,
}


@dataclass
class SafetensorsFile:
    """A safetensors file in memory: ``tensors`` (key -> tensor with its own storage, the file's
    dtype) and ``nonfinite`` (keys of floating-point tensors holding inf or NaN)."""

    header: SafetensorsHeader
    tensors: dict[str, torch.Tensor]
    nonfinite: frozenset[str]


def read_safetensors(path: str | Path) -> SafetensorsFile:
    """Read and check ``path`` (raises ``AdapterFileError`` for a truncated or malformed file)."""
    path = Path(path)
    buffer = _read_all(path)
    length = header_length(path, bytes(buffer[:8].numpy()), buffer.numel())
    header = parse_header(path, bytes(buffer[8 : 8 + length].numpy()), buffer.numel())
    data_offset = 8 + length
    views = {key: _view(buffer, data_offset, info) for key, info in header.tensors.items()}
    nonfinite = _nonfinite(buffer, data_offset, header, views)
    tensors = {key: view.clone() for key, view in views.items()}
    return SafetensorsFile(header, tensors, nonfinite)


def _read_all(path: Path) -> torch.Tensor:
    size = path.stat().st_size
    buffer = torch.empty(size, dtype=torch.uint8)
    target = memoryview(buffer.numpy())
    done = 0
    with path.open("rb", buffering=0) as handle:
        while done < size:
            count = handle.readinto(target[done:])
            if not count:
                break  # the file shrank while being read: the header check reports it
            done += count
    return buffer[:done]


def _view(buffer: torch.Tensor, data_offset: int, info) -> torch.Tensor:
    """The bytes of one tensor as that tensor (a view where the offset is aligned)."""
    raw = buffer[data_offset + info.start : data_offset + info.end]
    if (data_offset + info.start) % DTYPE_SIZES[info.dtype]:
        raw = raw.clone()  # a misaligned tensor (not written by safetensors): copy to align
    return raw.view(TORCH_DTYPES[info.dtype]).view(info.shape)


def _nonfinite(
    buffer: torch.Tensor, data_offset: int, header: SafetensorsHeader, views: dict
) -> frozenset[str]:
    bad: set[str] = set()
    by_dtype: dict[str, list[str]] = {}
    for key, info in header.tensors.items():
        if views[key].is_floating_point() and info.end > info.start:
            by_dtype.setdefault(info.dtype, []).append(key)
    for dtype, keys in by_dtype.items():
        start = data_offset + min(header.tensors[k].start for k in keys)
        end = data_offset + max(header.tensors[k].end for k in keys)
        size = DTYPE_SIZES[dtype]
        if dtype in _SUMMABLE and start % size == 0 and (end - start) % size == 0:
            span = buffer[start:end].view(TORCH_DTYPES[dtype])
            if bool(torch.isfinite(span.sum(dtype=_SUMMABLE[dtype]))):
                continue
        bad.update(k for k in keys if not bool(torch.isfinite(_checkable(views[k])).all()))
    return frozenset(bad)


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype ``torch.isfinite`` takes (float8 widened; exact, as is the rest)."""
    return tensor.float() if tensor.element_size() == 1 else tensor
