"""Malformed adapter files, one table for every reader of them (``load_adapter``, ``lorakit
inspect``, the server's load route): each case breaks a copy of a good lorakit adapter that
adapts ``q_proj`` and ``v_proj`` of a tiny Llama, and names words its error must contain.

``inspect`` reads the config and the header only: cases found in the tensor data or in parts of
the header inspect does not use (the fingerprint, the config copy) are summarised, not refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q_A = "layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "layers.0.self_attn.q_proj.lora_B.weight"
DEEP = "[" * 100_000 + "]" * 100_000


@dataclass(frozen=True)
class Case:
    name: str
    edit: Callable[[Path], None]
    words: tuple[str, ...]
    inspect_refuses: bool = True
    server_words: tuple[str, ...] | None = None  # where the server's message differs

    def words_for(self, reader: str) -> tuple[str, ...]:
        return self.server_words if reader == "server" and self.server_words else self.words


def _split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path: Path, header: bytes, data: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """An edit applying ``change(entries)`` to the header JSON (it may return raw bytes)."""

    def edit(directory: Path) -> None:
        entries, data = _split(directory / WEIGHTS)
        result = change(entries)
        raw = result if isinstance(result, bytes) else json.dumps(entries).encode()
        _write(directory / WEIGHTS, raw, data)

    return edit


def edit_metadata(**values) -> Callable[[Path], None]:
    return edit_header(lambda entries: entries["__metadata__"].update(values))


def edit_entry(suffix: str, **fields) -> Callable[[Path], None]:
    def change(entries: dict) -> None:
        key = next(k for k in entries if k.endswith(suffix))
        entries[key].update(fields)

    return edit_header(change)


def replace_tensors(**by_suffix: Callable[[torch.Tensor], torch.Tensor]):
    """An edit replacing the tensors whose key ends with a suffix (``Q_A``, ...) by
    ``make(old)``; the config copy in the header stays (the config is unchanged)."""

    def edit(directory: Path) -> None:
        path = directory / WEIGHTS
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        for suffix, make in by_suffix.items():
            key = next(k for k in tensors if k.endswith(suffix))
            tensors[key] = make(tensors[key]).contiguous()
        save_file(tensors, path, metadata=metadata)

    return edit


def offsets_of(target_suffix: str, source_suffix: str) -> Callable[[Path], None]:
    """An edit pointing the tensor ending with ``target_suffix`` at the bytes of the one ending
    with ``source_suffix`` (same shape and dtype: two keys share bytes, others are left over)."""

    def change(entries: dict) -> None:
        target = next(k for k in entries if k.endswith(target_suffix))
        source = next(k for k in entries if k.endswith(source_suffix))
        entries[target]["data_offsets"] = list(entries[source]["data_offsets"])

    return edit_header(change)


def repeat_key(suffix: str, copy_of: str) -> Callable[[Path], None]:
    """An edit appending to the header JSON a second entry for the key ending with ``suffix``,
    holding the entry of the key ending with ``copy_of`` (``json.loads`` keeps the last)."""

    def change(entries: dict) -> bytes:
        key = next(k for k in entries if k.endswith(suffix))
        other = next(k for k in entries if k.endswith(copy_of))
        text = json.dumps(entries)
        return f"{text[:-1]}, {json.dumps(key)}: {json.dumps(entries[other])}}}".encode()

    return edit_header(change)


def append_bytes(count: int) -> Callable[[Path], None]:
    """An edit appending ``count`` zero bytes after the last tensor (sparse: no disk used)."""

    def edit(directory: Path) -> None:
        path = directory / WEIGHTS
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size + count)

    return edit


def write_config(text: str | bytes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        raw = text.encode() if isinstance(text, str) else text
        (directory / CONFIG).write_bytes(raw)

    return edit


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / CONFIG
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return edit


def weights_replaced_by(kind: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / WEIGHTS
        path.unlink()
        if kind == "directory":
            path.mkdir()
        else:
            os.symlink(path.name, path)  # a link to itself: ELOOP on open

    return edit


def _config_with(**extra) -> str:
    return json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **extra})


_FINGERPRINT = "lorakit.base_fingerprint"
_Q = "model.layers.0.self_attn.q_proj"


def _fingerprint(modules) -> str:
    return json.dumps({"method": "golden64-v1", "modules": modules})


CASES = [
    Case(
        "config nested 100k deep",
        write_config(_config_with()[:-1] + f', "x": {DEEP}}}'),
        ("adapter_config.json", "nested too deeply"),
    ),
    Case("config a bare deep list", write_config(DEEP), ("nested too deeply",)),
    Case(
        "config not UTF-8",
        write_config(b'{"peft_type": "LORA", "r": 2, "x": "\xff\xfe"}'),
        ("not UTF-8",),
    ),
    Case(
        "config is a symlink loop",
        lambda d: ((d / CONFIG).unlink(), os.symlink(CONFIG, d / CONFIG)),
        (CONFIG,),
    ),
    Case(
        "header nested 100k deep",
        edit_header(lambda e: b'{"a": ' + DEEP.encode() + b"}"),
        ("not a valid safetensors file", "nested too deeply"),
    ),
    Case(
        "__metadata__ a list",
        edit_header(lambda e: e.update(__metadata__=["pt"])),
        ("__metadata__ is not an object of strings",),
    ),
    Case(
        "__metadata__ a string",
        edit_header(lambda e: e.update(__metadata__="pt")),
        ("__metadata__ is not an object of strings",),
    ),
    Case(
        "metadata value not a string",
        edit_metadata(format=5),
        ("__metadata__ is not an object of strings",),
    ),
    Case(
        "config copy not an object",
        edit_metadata(**{"lorakit.adapter_config": "[1, 2]"}),
        ("copy inside", "must hold a JSON object"),
    ),
    Case(
        "config copy nested deep",
        edit_metadata(**{"lorakit.adapter_config": DEEP}),
        ("copy inside", "nested too deeply"),
    ),
    Case(
        "fingerprint nested deep",
        edit_metadata(**{_FINGERPRINT: DEEP}),
        ("fingerprint", "unreadable", "nested too deeply"),
    ),
    Case(
        "fingerprint modules a list",
        edit_metadata(**{_FINGERPRINT: _fingerprint([])}),
        ("fingerprint", "'modules' is not an object"),
    ),
    Case(
        "fingerprint entry not an object",
        edit_metadata(**{_FINGERPRINT: _fingerprint({_Q: 5})}),
        ("fingerprint", f"module {_Q!r}: not an object"),
    ),
    Case(
        "fingerprint entry without shape",
        edit_metadata(**{_FINGERPRINT: _fingerprint({_Q: {"dtype": "float32"}})}),
        ("fingerprint", "shape None"),
    ),
    Case(
        "fingerprint values not base64",
        edit_metadata(
            **{
                _FINGERPRINT: _fingerprint(
                    {_Q: {"shape": [64, 64], "dtype": "float32", "sha256": "0", "values": "%%"}}
                )
            }
        ),
        ("fingerprint", "not base64"),
    ),
    Case(
        "header int of 5000 digits",
        edit_header(lambda e: (json.dumps(e)[:-1] + ', "x": ' + "9" * 5000 + "}").encode()),
        ("not a valid safetensors file", "not JSON"),
    ),
    Case(
        "config int of 5000 digits",
        write_config(_config_with()[:-1] + ', "x": ' + "9" * 5000 + "}"),
        ("adapter_config.json", "is not valid JSON"),
    ),
    Case(
        "two keys share bytes",
        offsets_of("layers.1.self_attn.q_proj.lora_A.weight", Q_A),
        ("not a valid safetensors file", "q_proj.lora_A.weight", "overlap or leave a gap"),
    ),
    Case(
        "header key repeated",
        repeat_key(Q_A, "layers.1.self_attn.q_proj.lora_A.weight"),
        ("not a valid safetensors file", Q_A, "appears twice"),
    ),
    Case(
        "bytes after the last tensor",
        append_bytes(4096),
        ("not a valid safetensors file", "4096 bytes after the last tensor"),
    ),
    Case("negative shape", edit_entry(Q_A, shape=[-2, 64]), ("shape [-2, 64]",)),
    Case("float shape", edit_entry(Q_A, shape=[2.0, 64]), ("shape [2.0, 64]",)),
    Case("boolean shape", edit_entry(Q_A, shape=[True, 64]), ("shape [True, 64]",)),
    Case(
        "data_offsets not integers", edit_entry(Q_A, data_offsets=[0.0, 512.0]), ("data_offsets",)
    ),
    Case("1-D factor", replace_tensors(**{Q_A: lambda t: t.reshape(-1)}), ("q_proj", "shape")),
    Case("boolean factor", replace_tensors(**{Q_A: lambda t: t > 0}), ("q_proj", "dtype")),
    Case(
        "integer factor", replace_tensors(**{Q_B: lambda t: t.to(torch.int32)}), ("q_proj", "dtype")
    ),
    Case(
        "rank-0 factors",
        replace_tensors(**{Q_A: lambda t: t[:0], Q_B: lambda t: t[:, :0]}),
        ("q_proj", "0, 64"),
    ),
    Case(
        "finite but absurd values",
        replace_tensors(**{Q_B: lambda t: torch.full_like(t, 3e38)}),
        (Q_B, "beyond +-65504"),
        inspect_refuses=False,
    ),
    Case(
        "values just beyond float16",
        replace_tensors(**{Q_A: lambda t: t * 0 + 7e4}),
        (Q_A, "beyond +-65504"),
        inspect_refuses=False,
    ),
    Case(
        "rank_pattern that backtracks",
        edit_config(rank_pattern={"(.*)*x": 4}),
        ("LoraConfig.rank_pattern key '(.*)*x'", "nested quantifiers"),
    ),
    Case(
        "target_modules that backtracks",
        edit_config(target_modules="(a|aa)*b"),
        ("LoraConfig.target_modules '(a|aa)*b'", "nested quantifiers"),
    ),
    Case("weights a directory", weights_replaced_by("directory"), ("not a regular file",)),
    Case(
        "weights a symlink loop",
        weights_replaced_by("loop"),
        ("not a regular file",),
        server_words=("cannot be resolved", WEIGHTS),
    ),
]


def write_header_only_file(path, tensors: dict, metadata: dict) -> int:
    """A safetensors file whose data region is a hole (sparse): header real, tensors zeros."""
    entries, offset = {"__metadata__": metadata}, 0
    for name, shape in tensors.items():
        size = 4 * math.prod(shape)
        entries[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + offset)
    return 8 + len(header) + offset
