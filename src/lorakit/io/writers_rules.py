"""For ``lorakit inspect``: which peft wrote an adapter file, and where that peft's rules read
its config otherwise than peft 0.22's, the meaning ``load_adapter`` loads it with.

A ``modules_to_save`` entry or a ``trainable_token_indices`` key of a file written by peft
before 0.22 picked every module whose name ENDS with it (``"norm"``: ``model.norm`` and every
``*_layernorm``); peft 0.22 picks the entry and the names ending in ``"." + entry``.
``load_adapter`` reads such a file by its writer's rule (``io.older_peft_files``); without a
model, the names are those the file's tensor keys name (``read_as_written`` with no model),
which for a file holding a tensor of each picked module are the ones a load picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.io.config_json import CONFIG_NAME, peft_only_base_init, read_config_text
from lorakit.io.older_peft_files import read_as_written
from lorakit.io.read import read_adapter_header
from lorakit.moe_entries import file_peft_version

__all__ = ["writers_rules"]


def writers_rules(directory: Path) -> dict[str, Any]:
    """``{"peft_version": the file's (None: not recorded, as lorakit's own files and peft
    < 0.18), "read_as_written": one line per entry or key that the writer's rule reads
    otherwise than peft 0.22's, with the modules ``load_adapter`` reads it as}``. A file that
    loading refuses unconverted (CorDA, LoRA-GA) gets no lines."""
    text = read_config_text(directory / CONFIG_NAME)
    version = file_peft_version(text)
    if peft_only_base_init(text) is not None:
        return {"peft_version": version, "read_as_written": []}
    header = read_adapter_header(directory)
    written, read = header.config, read_as_written(header).config
    lines = _saved_lines(written.modules_to_save or [], read.modules_to_save or [], version)
    lines += _token_lines(written.trainable_token_indices, read.trainable_token_indices, version)
    return {"peft_version": version, "read_as_written": lines}


def _writer(version: str | None) -> str:
    return f"peft {version}" if version else "its writer (a peft before 0.22)"


def _saved_lines(written: list[str], read: list[str], version: str | None) -> list[str]:
    """One line per ``modules_to_save`` entry not read as itself: the full names read for it."""
    lines = []
    for entry in written:
        if entry in read:
            continue
        names = [name for name in read if name.endswith(entry)]
        lines.append(
            f"modules_to_save {entry!r}: every module whose name ends with it, as "
            f"{_writer(version)} picked them: {', '.join(names)} (peft 0.22's rule: "
            f"{entry!r} and names ending in '.{entry}')"
        )
    return lines


def _token_lines(written: Any, read: Any, version: str | None) -> list[str]:
    """One line per ``trainable_token_indices`` key not read as itself: the embeddings read."""
    if not isinstance(written, dict) or not isinstance(read, dict) or written == read:
        return []
    lines = []
    for key in written:
        if key in read:
            continue
        names = [name for name in read if name.endswith(key)]
        lines.append(
            f"trainable_token_indices {key!r}: the embeddings whose names end with it, as "
            f"{_writer(version)} picked them: {', '.join(names)} (peft 0.22's rule: "
            f"{key!r} and names ending in '.{key}')"
        )
    return lines
