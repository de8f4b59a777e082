"""Adapter files in PEFT's format, bound to their base model, safe against bad files.

- ``save_adapter(model, directory, adapter_name="default", *, dtype=None)``
- ``load_adapter(model, directory, adapter_name="default", *, allow_base_mismatch=False)``
- ``read_adapter(directory)`` -> ``AdapterFile`` (``.config``, ``.tensors``, ``.nonfinite``,
  ``.huge``, ``.fingerprint``); in two steps, ``read.read_adapter_header`` (config and header, no
  data) then ``read.read_adapter_data``; the weights file is read by
  ``lorakit.io.tensors.read_safetensors`` (one read, values checked for inf/NaN and range in bulk).
  Adapter files are untrusted input: every malformed file is an ``AdapterFileError``.
- ``save_merged_model(model, directory, tokenizer=None)`` (``lorakit.io.merged``)
- ``lorakit.io.atomic``: atomic file writes.

Format facts and lorakit's additions: docs/adapter-files.md.
"""

from typing import TYPE_CHECKING

from lorakit.io import atomic
from lorakit.lazy_exports import lazy_exports

if TYPE_CHECKING:  # at run time ``__getattr__`` loads these on first use
    from lorakit.io.load import load_adapter
    from lorakit.io.merged import save_merged_model
    from lorakit.io.read import AdapterFile, read_adapter
    from lorakit.io.save import save_adapter

__all__ = [
    "AdapterFile",
    "atomic",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "save_merged_model",
]

lazy_exports(
    __name__,
    {
        "AdapterFile": "read",
        "load_adapter": "load",
        "read_adapter": "read",
        "save_adapter": "save",
        "save_merged_model": "merged",
    },
)
