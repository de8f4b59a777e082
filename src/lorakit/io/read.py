"""Read an adapter directory into memory, checking the files but not touching any model.

``read_adapter(directory)`` -> ``AdapterFile`` with ``.config`` (``LoraConfig``), ``.tensors``
(PEFT key -> tensor, as stored), ``.fingerprint`` (or None for files written by peft) and
``.metadata`` (a DoRA magnitude's key in PEFT's spelling, ``keys.canonical_key``); in two steps, ``read_adapter_header`` (config and safetensors header: keys, dtypes,
shapes; no tensor data) then ``read_adapter_data``, so that callers can refuse a file that does
not fit before reading its data. Pickle files (``adapter_model.bin``) are never opened. Every
failure, down to an unreadable path or JSON nested too deeply, is an ``AdapterFileError``.

``refuse_residual_base_factors`` (``io.residual_base``'s, importable here) is for readers that
take a file's A and B as a plain LoRA of the original base without loading it onto a model
(serving, GGUF export, combining, analysis): it refuses a PiSSA / OLoRA adapter saved without
conversion, whose factors only fit the residual base that init left (``read_plain_lora``).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.io import fingerprint, fingerprint_json
from lorakit.io.adapter_dirs import (
    CONFIG_METADATA_KEY,
    WEIGHTS_NAME,
    adapter_directory,
    interrupted_save,
)
from lorakit.io.config_json import CONFIG_NAME, config_from_json, read_config_text
from lorakit.io.header import TensorInfo, read_header, unreadable
from lorakit.io.keys import canonical_key, canonical_keys
from lorakit.io.residual_base import (
    BASE_INIT_METADATA_KEY,
    refuse_residual_base_factors,
    residual_base_init,
)
from lorakit.io.tensors import MAX_ABS_VALUE, read_safetensors

__all__ = [
    "BASE_INIT_METADATA_KEY",
    "CONFIG_METADATA_KEY",
    "PICKLE_NAME",
    "WEIGHTS_NAME",
    "AdapterFile",
    "AdapterHeader",
    "read_adapter",
    "read_adapter_data",
    "read_adapter_header",
    "read_plain_lora",
    "refuse_residual_base_factors",
    "residual_base_init",
    "weights_path",
]

PICKLE_NAME = "adapter_model.bin"


@dataclass
class AdapterHeader:
    """An adapter's config and safetensors header, checked, without any tensor data:
    ``tensors`` maps each key to its dtype, shape and offsets (``header.TensorInfo``)."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, TensorInfo]
    fingerprint: dict[str, dict[str, object]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    config_text: str = ""
    """``adapter_config.json`` as read (its keys lorakit's ``LoraConfig`` does not hold, e.g.
    PEFT's ``auto_mapping``, for ``lorakit.combining``)."""

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME


@dataclass
class AdapterFile:
    """An adapter read from disk (nothing loaded into a model yet)."""

    directory: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    nonfinite: frozenset[str]  # keys of tensors holding inf/NaN
    fingerprint: dict[str, dict[str, object]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    huge: frozenset[str] = frozenset()  # keys of tensors with finite values beyond MAX_ABS_VALUE

    def require_finite(self, keys: Iterable[str] | None = None) -> None:
        """Raise ``AdapterFileError`` naming the first of ``keys`` (default: every tensor, in
        key order) that holds inf/NaN values or finite values beyond +-``MAX_ABS_VALUE``."""
        for key in sorted(self.nonfinite | self.huge) if keys is None else keys:
            if key in self.nonfinite:
                raise AdapterFileError(
                    f"adapter {self.directory}: tensor {key} holds inf/NaN values; the adapter "
                    "is broken (diverged training?) and was not loaded."
                )
            if key in self.huge:
                raise AdapterFileError(
                    f"adapter {self.directory}: tensor {key} holds values beyond "
                    f"+-{MAX_ABS_VALUE:g} (float16's range); the adapter is broken (diverged "
                    "training, or bytes that are not what the header says) and was not loaded."
                )


def pickle_refusal(path: Path) -> AdapterFileError:
    """The error for an ``adapter_model.bin``: why it is not opened and how to convert it
    (``conversion_command``)."""
    return AdapterFileError(
        f"{path} is a pickle file and lorakit never unpickles files (loading a pickle can run "
        "arbitrary code). If you trust its origin, convert it once to safetensors with: "
        f"{conversion_command(path)}"
    )


def conversion_command(path: Path) -> str:
    """A POSIX shell command that converts the pickle ``path`` to ``adapter_model.safetensors``
    beside it (``torch.load(..., weights_only=True)`` + ``save_file``). The Python code is a
    constant and the two paths are its ``sys.argv``, each one ``shlex.quote``d word: a path
    holding quotes, ``$``, backticks or spaces is neither broken nor changed by the shell."""
    code = (
        "import sys, torch; from safetensors.torch import save_file; "
        'state = torch.load(sys.argv[1], map_location="cpu", weights_only=True); '
        "save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2], "
        'metadata={"format": "pt"})'
    )
    paths = (str(path), str(path.with_name(WEIGHTS_NAME)))
    return " ".join(["python", "-c", *(shlex.quote(word) for word in (code, *paths))])


def weights_path(directory: Path) -> Path:
    """``directory/adapter_model.safetensors``; ``AdapterFileError`` when it is missing or not a
    file (a pickle-only adapter gets the conversion hint)."""
    path = directory / WEIGHTS_NAME
    if path.is_file():
        return path
    if (directory / PICKLE_NAME).is_file():
        raise pickle_refusal(directory / PICKLE_NAME)
    if path.exists() or path.is_symlink():
        raise AdapterFileError(f"{path} is not a regular file (a directory, or a broken link).")
    raise AdapterFileError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")


def read_adapter_header(directory: str | Path) -> AdapterHeader:
    """Read ``adapter_config.json`` and the safetensors HEADER of ``directory`` (no tensor data),
    checked as ``read_adapter`` checks them. Raises ``AdapterFileError``."""
    directory = adapter_directory(directory)
    try:
        weights = weights_path(directory)
    except OSError as error:
        raise unreadable(directory, error) from None
    config_path = directory / CONFIG_NAME
    header = read_header(weights)
    stored_text = header.metadata.get(CONFIG_METADATA_KEY)
    if interrupted_save(directory):
        warnings.warn(
            f"{config_path} is missing (a save interrupted between its renames): using the "
            f"config saved inside {weights.name}, which fits its tensors. Save the adapter "
            "again for peft to read the directory.",
            stacklevel=2,
        )
        config_text = stored_text
    else:
        config_text = read_config_text(config_path)
    config = config_from_json(config_text, str(config_path))
    if stored_text is not None and stored_text != config_text:
        config = _reconcile(config, stored_text, str(config_path))
    stored_fingerprint = header.metadata.get(fingerprint.METADATA_KEY)
    return AdapterHeader(
        directory=directory,
        config=config,
        tensors=_canonical(header.tensors, weights),
        fingerprint=None
        if stored_fingerprint is None
        else fingerprint_json.from_metadata(stored_fingerprint, str(weights)),
        metadata=dict(header.metadata),
        config_text=config_text,
    )


def read_adapter_data(header: AdapterHeader) -> AdapterFile:
    """The tensors ``header`` describes, read whole and checked (``read_safetensors``); refused
    if the files changed since the header was read: other tensor entries or metadata in the
    weights file, or another ``adapter_config.json`` (``_config_unchanged``), so that the
    config read first is never paired with the tensors of a directory replaced meanwhile."""
    contents = read_safetensors(header.weights_path)
    if (
        _canonical(contents.header.tensors, header.weights_path) != header.tensors
        or contents.header.metadata != header.metadata
        or not _config_unchanged(header)
    ):
        raise AdapterFileError(
            f"{header.weights_path} changed while it was being read; retry once the save ends."
        )
    return AdapterFile(
        directory=header.directory,
        config=header.config,
        tensors=_canonical(contents.tensors, header.weights_path),
        nonfinite=frozenset(map(canonical_key, contents.nonfinite)),
        fingerprint=header.fingerprint,
        metadata=header.metadata,
        huge=frozenset(map(canonical_key, contents.huge)),
    )


def _canonical(tensors: dict, path: Path) -> dict:
    """``tensors`` under PEFT's keys (``keys.canonical_keys``: a DoRA magnitude spelled
    ``<path>.lora_magnitude_vector.weight`` is read as ``<path>.lora_magnitude_vector``, as
    peft reads it), so that every reader (load, serve, combine) sees one spelling."""
    try:
        return canonical_keys(tensors)
    except ValueError as error:
        raise AdapterFileError(f"{path}: {error}") from None


def _config_unchanged(header: AdapterHeader) -> bool:
    """Whether ``adapter_config.json`` still holds the text ``header`` was read with (read again
    after the tensors: a redeploy with the same shapes and another ``lora_alpha`` changes only
    it). A header made without that text (``config_text`` empty) is not checked."""
    if not header.config_text:
        return True
    if not os.path.lexists(header.directory / CONFIG_NAME):  # an interrupted save's: the
        return header.metadata.get(CONFIG_METADATA_KEY) == header.config_text  # weights' own
    try:
        return read_config_text(header.directory / CONFIG_NAME) == header.config_text
    except AdapterFileError:  # (deleted or unreadable meanwhile: changed)
        return False


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from ``directory``.

    Raises ``AdapterFileError`` for a missing, unreadable, truncated or corrupted file, an
    unusable config, or a pickle-only adapter.
    """
    return read_adapter_data(read_adapter_header(directory))


def read_plain_lora(directory: str | Path, doing: str) -> AdapterFile:
    """``read_adapter`` for a reader that takes the file's A and B as a plain LoRA of the
    original base (``doing``: what it does with them): an unconverted PiSSA / OLoRA file is
    refused from its header, before its tensors are read (``refuse_residual_base_factors``)."""
    header = read_adapter_header(directory)
    refuse_residual_base_factors(header, doing)
    return read_adapter_data(header)


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
