"""Read an adapter directory into memory, checking the files but not touching any model.

``read_adapter(directory)`` -> ``AdapterFile`` with ``.config`` (``LoraConfig``), ``.tensors``
(PEFT key -> tensor, as stored), ``.fingerprint`` (or None for files written by peft) and
``.metadata``. Pickle files (``adapter_model.bin``) are never opened.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io import fingerprint
from lorakit.io.config_json import CONFIG_NAME, config_from_json
from lorakit.io.tensors import read_safetensors

__all__ = [
    "CONFIG_METADATA_KEY",
    "PICKLE_NAME",
    "WEIGHTS_NAME",
    "AdapterFile",
    "adapter_directory",
    "read_adapter",
]

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# lorakit also stores the config text inside the weights file: both are then written together
# in one atomic rename, so a save interrupted between the two files is detected and repaired.
CONFIG_METADATA_KEY = "lorakit.adapter_config"


@dataclass
class AdapterFile:
    """An adapter read from disk (nothing loaded into a model yet)."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    nonfinite: frozenset[str]  # keys of tensors holding inf/NaN
    fingerprint: dict[str, dict[str, object]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def require_finite(self, keys: Iterable[str] | None = None) -> None:
        """Raise ``AdapterFileError`` naming the first of ``keys`` (default: every tensor, in
        key order) that holds inf/NaN values."""
        for key in sorted(self.nonfinite) if keys is None else keys:
            if key in self.nonfinite:
                raise AdapterFileError(
                    f"adapter {self.directory}: tensor {key} holds inf/NaN values; the adapter "
                    "is broken (diverged training?) and was not loaded."
                )


def adapter_directory(directory: str | Path, adapter_name: str = "default") -> Path:
    """``directory/adapter_name`` if it holds an adapter (PEFT's layout for adapters other than
    "default"), else ``directory``. Raises ``AdapterFileError`` naming what was looked for."""
    directory = Path(directory)
    for candidate in (directory / adapter_name, directory):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not directory.exists():
        raise AdapterFileError(f"adapter directory {directory} does not exist.")
    raise AdapterFileError(
        f"no {CONFIG_NAME} in {directory} (nor in {directory / adapter_name}); is this an "
        "adapter directory saved by lorakit or peft?"
    )


def pickle_refusal(path: Path) -> AdapterFileError:
    """The error for an ``adapter_model.bin``: why it is not opened and how to convert it."""
    target = path.with_name(WEIGHTS_NAME)
    return AdapterFileError(
        f"{path} is a pickle file and lorakit never unpickles files (loading a pickle can run "
        "arbitrary code). If you trust its origin, convert it once to safetensors with: "
        f'python -c "import torch; from safetensors.torch import save_file; '
        f"state = torch.load('{path}', map_location='cpu', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in state.items()}}, '{target}', "
        f"metadata={{'format': 'pt'}})\""
    )


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from ``directory``.

    Raises ``AdapterFileError`` for a missing, truncated or corrupted file, an unusable config,
    or a pickle-only adapter.
    """
    directory = adapter_directory(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise pickle_refusal(directory / PICKLE_NAME)
        raise AdapterFileError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    config_path = directory / CONFIG_NAME
    config_text = config_path.read_text(encoding="utf-8", errors="replace")
    config = config_from_json(config_text, str(config_path))
    contents = read_safetensors(weights_path)
    header = contents.header
    stored_text = header.metadata.get(CONFIG_METADATA_KEY)
    if stored_text is not None and stored_text != config_text:
        config = _reconcile(config, stored_text, str(config_path))
    stored_fingerprint = header.metadata.get(fingerprint.METADATA_KEY)
    return AdapterFile(
        directory=directory,
        config=config,
        tensors=contents.tensors,
        nonfinite=contents.nonfinite,
        fingerprint=None
        if stored_fingerprint is None
        else fingerprint.from_metadata(stored_fingerprint, str(weights_path)),
        metadata=dict(header.metadata),
    )


def _numeric(config: LoraConfig) -> dict[str, object]:
    return dataclasses.replace(config, base_model_name_or_path=None).to_dict()


def _reconcile(config: LoraConfig, stored_text: str, source: str) -> LoraConfig:
    """The JSON file and the copy saved with the weights differ: a hand edit that does not
    change the numbers keeps the file's config; otherwise the weights' own copy wins."""
    stored = config_from_json(stored_text, f"{source} (copy inside {WEIGHTS_NAME})")
    if _numeric(stored) == _numeric(config):
        return config
    warnings.warn(
        f"{source} does not match the config saved with the weights (an interrupted save, or "
        "an edit); using the config saved with the weights, which fits the tensors.",
        stacklevel=3,
    )
    return stored
