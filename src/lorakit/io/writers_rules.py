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
    lines = _lines(
        "modules_to_save",
        "every module whose name ends with it",
        written.modules_to_save,
        read.modules_to_save,
        version,
    )
    # a list of token ids (not a dict of embeddings) names no module
    written_keys, read_keys = (
        c.trainable_token_indices if isinstance(c.trainable_token_indices, dict) else None
        for c in (written, read)
    )
    lines += _lines(
        "trainable_token_indices",
        "the embeddings whose names end with it",
        written_keys,
        read_keys,
        version,
    )
    return {"peft_version": version, "read_as_written": lines}


def _writer(version: str | None) -> str:
    return f"peft {version}" if version else "its writer (a peft before 0.22)"


def _lines(field: str, picked: str, written: Any, read: Any, version: str | None) -> list[str]:
    """One line per entry of ``field`` (a list of ``modules_to_save`` entries, or the keys of a
    ``trainable_token_indices`` dict) not read as itself: the full names read for it."""
    if not written or not read or written == read:
        return []
    lines = []
    for entry in written:
        if entry in read:
            continue
        names = [name for name in read if name.endswith(entry)]
        lines.append(
            f"{field} {entry!r}: {picked}, as {_writer(version)} "
            f"picked them: {', '.join(names)} (peft 0.22's rule: {entry!r} and names ending "
            f"in '.{entry}')"
        )
    return lines
