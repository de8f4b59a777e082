"""Header values of a GGUF file, read from the ``gguf`` package's reader fields only once their
type is the one asked for: a bad value (another type, a string that is not UTF-8, a per-layer
array that differs) is one ``UserError`` naming the file and the key, never a raw decode or
conversion error. Used by ``gguf_file.replace_llama_linears``; imports nothing of ``gguf``.
"""

from __future__ import annotations

import os

from lorakit.errors import UserError

__all__ = ["header_count", "header_string"]

# GGUFValueType names of the integer types (any width and sign reads as a count)
INTEGER_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}


def _bad_value(path: str | os.PathLike[str], key: str, problem: str) -> UserError:
    return UserError(
        f"GGUF file '{path}': its {key} {problem}; the file is corrupt or not a Llama-family "
        "GGUF file lorakit reads: use a GGUF file written by llama.cpp's convert_hf_to_gguf.py"
    )


def _type_name(field) -> str:
    """``field``'s value type as GGUF names it: ``UINT32``, ``STRING``, ``ARRAY of INT32``."""
    names = [value_type.name for value_type in field.types]
    if names[:1] == ["ARRAY"]:
        return "ARRAY of " + " of ".join(names[1:]) if len(names) > 1 else "empty ARRAY"
    return names[0] if names else "value of no type"


def header_string(reader, path: str | os.PathLike[str], key: str) -> str | None:
    """The string at ``key`` (None when absent); ``UserError`` if it is no string or not UTF-8."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if [value_type.name for value_type in field.types] != ["STRING"]:
        raise _bad_value(path, key, f"has type {_type_name(field)}, not STRING")
    raw = bytes(field.parts[field.data[0]])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _bad_value(
            path, key, f"is not UTF-8 text ({error.reason} at byte {error.start} of {raw[:40]!r})"
        ) from None


def header_count(
    reader, path: str | os.PathLike[str], key: str, blocks: int | None = None
) -> int | None:
    """The integer at ``key`` (None when absent); ``UserError`` for any other type.

    ``blocks`` given: ``key`` may also be an array of one integer per block (llama.cpp's
    ``get_key_or_arr``, e.g. per-layer head counts); lorakit builds one config for every layer,
    so the array reads as its one value, and only if it has ``blocks`` entries, all equal."""
    field = reader.fields.get(key)
    if field is None:
        return None
    names = [value_type.name for value_type in field.types]
    if len(names) == 1 and names[0] in INTEGER_TYPES:
        return int(field.contents())
    array = len(names) == 2 and names[0] == "ARRAY" and names[1] in INTEGER_TYPES
    if blocks is None or not array:
        wanted = "an integer" if blocks is None else "an integer or an array of integers"
        raise _bad_value(path, key, f"has type {_type_name(field)}, not {wanted}")
    entries = [int(entry) for entry in field.contents()]
    if len(entries) != blocks:
        raise _bad_value(
            path,
            key,
            f"has {len(entries)} entries, not one per block (llama.block_count = {blocks})",
        )
    if len(set(entries)) > 1:
        shown = entries if len(entries) <= 8 else [*entries[:8], "..."]
        raise UserError(
            f"GGUF file '{path}': its {key} differs between layers ({shown}); lorakit reads only "
            "models with the same count in every layer (one transformers config for all): use "
            "another GGUF file"
        )
    return entries[0]
