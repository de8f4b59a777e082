"""Writing GGUF files: tensor encodings and an atomic write through ``gguf.GGUFWriter``.

Layout convention (``gguf`` package): a numpy array of shape ``(rows, cols)`` is stored with
ggml dimensions ``ne = [cols, rows]`` (ggml lists the fastest-varying axis first), so a
transformers ``nn.Linear`` weight ``(out, in)`` is written as it is and llama.cpp reads it as
``ne = [in, out]``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lorakit.errors import UserError
from lorakit.io import atomic

__all__ = [
    "TENSOR_TYPES",
    "check_complete",
    "check_output_path",
    "decode_tensor",
    "encode_tensor",
    "planned_size",
    "write_gguf",
]

# --type value -> GGMLQuantizationType name. q8_0 / q4_0 quantise blocks of 32 along a row.
TENSOR_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
QUANTIZED_BLOCK = 32


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def encode_tensor(tensor: torch.Tensor, type_name: str) -> tuple[np.ndarray, object]:
    """``(data, GGMLQuantizationType)`` of ``tensor`` stored as ``type_name`` (a ``TENSOR_TYPES``
    key); quantised types need a last dimension that is a multiple of 32 (the caller picks f16
    otherwise)."""
    import gguf

    qtype = _qtype(TENSOR_TYPES[type_name])
    array = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    return gguf.quants.quantize(array, qtype), qtype


def decode_tensor(reader_tensor) -> torch.Tensor:
    """A ``gguf.GGUFReader`` tensor as float32, numpy axis order (``ne`` reversed)."""
    import gguf

    array = gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(reader_tensor.shape))
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
    """``path`` as a ``Path`` if a GGUF file can be written there (its directory exists and it is
    not a directory itself; an existing file only with ``overwrite``, which the Python API
    allows and the export command passes as ``--overwrite``), else ``UserError`` naming
    ``--output`` and what is in the way; the export command checks this before it loads
    anything."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--output {target} is a directory; give a file name ending in .gguf")
    if not overwrite and (target.exists() or target.is_symlink()):
        raise UserError(
            f"export: --output {target} already exists; give another --output, remove it, or "
            "pass --overwrite to replace it"
        )
    if target.parent.exists() and not target.parent.is_dir():
        raise UserError(
            f"--output {target}: {target.parent} is a file, not a directory; give a path in an "
            "existing directory"
        )
    if not target.parent.is_dir():
        raise UserError(f"--output {target}: directory {target.parent} does not exist")
    return target


def write_gguf(path: str | os.PathLike[str], arch: str, fill: Callable[[object], None]) -> Path:
    """Write a GGUF file: ``fill(writer)`` adds key/values and tensors to a ``gguf.GGUFWriter``
    for ``arch``; the file appears at ``path`` only when complete and on the disk
    (``io.atomic.write_with``: temporary file, fsync, rename).

    The writer stores tensors with numpy's ``tofile``, whose buffered writes lose a full disk's
    error when they are closed, so the temporary file's size is checked against the writer's
    plan (``planned_size``) before it replaces anything: a short file raises ``OSError``
    (``ENOSPC``) naming ``path``, and any previous file there stays as it was."""
    import gguf

    target = check_output_path(path)

    def write(temporary: str) -> None:
        writer = gguf.GGUFWriter(temporary, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()  # (flushed: Python's own writes raise on a full disk)
        planned = planned_size(writer, writer.fout[0].tell())
        writer.write_tensors_to_file()
        writer.close()
        check_complete(temporary, planned, target)

    atomic.write_with(target, write)
    return target


def planned_size(writer, header_and_kv_bytes: int) -> int:
    """The size in bytes of the single-file GGUF that ``writer`` (a ``gguf.GGUFWriter`` whose
    header and key/values take ``header_and_kv_bytes``) is about to write: then one tensor info
    per tensor (name as u64 length + UTF-8 bytes, u32 n_dims, u64 per dimension, u32 type, u64
    offset), padding to the alignment, and each tensor's data padded to the alignment."""
    import gguf

    (tensors,) = writer.tensors  # one shard: lorakit never splits
    align = writer.data_alignment
    infos = sum(
        8 + len(name.encode("utf-8")) + 4 + 8 * len(ti.shape) + 4 + 8
        for name, ti in tensors.items()
    )
    data = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, align) for ti in tensors.values())
    return gguf.GGUFWriter.ggml_pad(header_and_kv_bytes + infos, align) + data


def check_complete(written: str | os.PathLike[str], planned: int, target: Path) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``target`` unless the file ``written`` (its temporary
    file) holds the ``planned`` bytes: a write that the disk refused without an error reaching
    Python (numpy's buffered ``tofile``) leaves it short."""
    size = os.path.getsize(written)
    if size != planned:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} (the GGUF file came out {size} of {planned} bytes; "
            "nothing was replaced)",
            str(target),
        )
