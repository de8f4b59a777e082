"""Writing GGUF files: tensor encodings and an atomic write through ``gguf.GGUFWriter``.

Layout convention (``gguf`` package): a numpy array of shape ``(rows, cols)`` is stored with
ggml dimensions ``ne = [cols, rows]`` (ggml lists the fastest-varying axis first), so a
transformers ``nn.Linear`` weight ``(out, in)`` is written as it is and llama.cpp reads it as
``ne = [in, out]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lorakit.errors import UserError
from lorakit.io import atomic

__all__ = ["TENSOR_TYPES", "check_output_path", "decode_tensor", "encode_tensor", "write_gguf"]

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


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path`` if a GGUF file can be written there (its directory exists and it is
    not a directory itself), else ``UserError`` naming ``--output`` and what is in the way; the
    export command checks this before it loads anything."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--output {target} is a directory; give a file name ending in .gguf")
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
    (``io.atomic.write_with``: temporary file, fsync, rename)."""
    import gguf

    target = check_output_path(path)

    def write(temporary: str) -> None:
        writer = gguf.GGUFWriter(temporary, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic.write_with(target, write)
    return target
