"""The base fingerprint in the safetensors header (``lorakit.io.fingerprint``'s entries as
JSON): ``to_metadata`` writes it compact and deterministic under ``fingerprint.METADATA_KEY``;
``from_metadata`` reads it back checking every entry's fields and types, so a corrupted or
foreign header is one ``AdapterFileError`` naming the first bad entry, never a crash later.
"""

from __future__ import annotations

import base64
import json
import math

from lorakit.errors import AdapterFileError
from lorakit.io.fingerprint import METADATA_KEY, METHOD, SAMPLES, is_quantized_format

__all__ = ["from_metadata", "to_metadata"]


def to_metadata(fingerprints: dict[str, dict[str, object]]) -> str:
    """Compact, deterministic JSON for the safetensors header."""
    payload = {"method": METHOD, "modules": fingerprints}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def from_metadata(text: str, source: str) -> dict[str, dict[str, object]]:
    """Parse the header entry written by ``to_metadata``, checking every entry's fields and
    types (``AdapterFileError`` naming the first bad one)."""
    try:
        payload = json.loads(text)
        if not isinstance(payload, dict) or payload.get("method") != METHOD:
            method = payload.get("method") if isinstance(payload, dict) else None
            raise ValueError(f"unknown method {method!r}")
        modules = payload.get("modules")
        if not isinstance(modules, dict):
            raise ValueError("'modules' is not an object")
        for name, entry in modules.items():
            _check_entry(name, entry)
        return dict(modules)
    except RecursionError:
        error = ValueError("JSON nested too deeply")
    except ValueError as caught:
        error = caught
    raise AdapterFileError(
        f"{source}: the base-model fingerprint ({METADATA_KEY}) is unreadable ({error}); "
        "the file may be corrupted, or written by a newer lorakit."
    )


def _check_entry(name: str, entry: object) -> None:
    """``ValueError`` unless ``entry`` is ``{"shape": [int >= 0], "dtype": str, "sha256": str,
    "values": base64 of one float32 per sample}`` (and a quantized base's optional fields,
    ``quantized_fingerprint.check_fields``)."""
    if not isinstance(entry, dict):
        raise ValueError(f"module {name!r}: not an object")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"module {name!r}: shape {shape!r} is not a list of integers >= 0")
    for field in ("dtype", "sha256", "values"):
        if not isinstance(entry.get(field), str):
            raise ValueError(f"module {name!r}: {field} is missing or not a string")
    try:
        values = base64.b64decode(entry["values"], validate=True)
    except ValueError:
        raise ValueError(f"module {name!r}: values are not base64") from None
    if len(values) != 4 * min(SAMPLES, math.prod(shape)):
        raise ValueError(f"module {name!r}: {len(values)} bytes of values for shape {shape}")
    if is_quantized_format(entry["dtype"]):
        from lorakit.io import quantized_fingerprint

        quantized_fingerprint.check_fields(name, entry)
