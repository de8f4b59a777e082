"""The user cache of converted models: ``$LORAKIT_CACHE/models/<name>`` (default
``~/.cache/lorakit/models/<name>``), each a plain transformers directory converted once from a
GGUF file, published by an atomic rename under a file lock so racing processes convert once and
a reader never sees half a model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lorakit.errors import UserError

__all__ = [
    "CONVERSION_MARKER",
    "cache_root",
    "convert_gguf",
    "converted_directory",
    "is_complete",
    "publish_directory",
]

CONVERSION_MARKER = "lorakit-conversion.json"
CONVERSION_VERSION = 1


def cache_root() -> Path:
    """The lorakit cache: ``$LORAKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lorakit`` or
    ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorakit"


def converted_directory(name: str, install: str, gguf_path: Path) -> Path:
    """``<cache>/models/<name>``, converted from the GGUF file on first use (process-safe);
    ``install``: the command that installs the package holding the file (for errors)."""
    target = cache_root() / "models" / name
    if is_complete(target):
        return target
    for module, command in (("gguf", install), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"converting '{name}' from GGUF needs the package '{module}'; "
                f"install it with: {command}"
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.parent / f".{name}.lock") as locked:
            if not is_complete(target):  # another process may have finished while we waited
                if locked:  # staging dirs left by killed conversions (no live one holds the lock)
                    for stale in target.parent.glob(f".{target.name}.tmp-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                convert_gguf(gguf_path, target)
    except OSError as error:  # not writable, a file in the way, a read-only file system, ...
        raise UserError(
            f"cannot write the model cache at '{target.parent}' "
            f"({error.strerror or type(error).__name__}); "
            "set LORAKIT_CACHE to a writable directory"
        ) from None
    return target


def is_complete(directory: Path) -> bool:
    """A converted directory is complete once it exists with its marker (it appears by rename)."""
    if not directory.exists():
        return False
    if not (directory / CONVERSION_MARKER).is_file():
        raise UserError(
            f"model cache '{directory}' is incomplete or not made by lorakit; delete it and retry"
        )
    return True


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[bool]:
    """An exclusive advisory lock (POSIX ``flock``), so racing processes convert only once.
    Yields whether the lock is held: without ``fcntl`` (Windows) there is none, and the atomic
    rename alone keeps the cache whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` into a plain fp32 transformers directory at ``target``.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf"), so the weights move
    into a fresh model built from the same config without ``quantization_config``
    (``load_state_dict(strict=True)``, tied embeddings kept). Written into a temporary directory
    beside ``target`` and renamed into place, so a reader never sees half a model.

    Building that model draws random initial weights from torch's global RNG; the conversion
    runs on a forked RNG, so a seeded run gets the same random numbers after ``load_model``
    whether the model was converted in the process or read from the cache.
    """
    print(f"lorakit: converting {gguf_path.name} to {target} (once, ~30 s) ...", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        model, tokenizer = _dequantised_model(gguf_path)
    marker = {"source": gguf_path.name, "version": CONVERSION_VERSION}
    publish_directory(target, marker, model.save_pretrained, tokenizer.save_pretrained)


def _dequantised_model(gguf_path: Path):
    """``(plain fp32 model, tokenizer with a pad token)`` read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain_model.config.pad_token_id = tokenizer.pad_token_id
    return plain_model, tokenizer


def publish_directory(
    target: Path, marker: dict[str, object], *writers: Callable[[Path], object]
) -> None:
    """Run each ``writer(staging_dir)``, add the ``marker`` JSON, and rename the staging directory to
    ``target``. If another process published ``target`` first, ours is discarded; on any error the
    staging directory is removed and ``target`` is left untouched."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for write in writers:
            write(staging)
        (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the cache is readable like ~/.cache
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
