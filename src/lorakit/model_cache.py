"""The user cache of converted models: ``$LORAKIT_CACHE/models/<name>`` (default
``~/.cache/lorakit/models/<name>``), each a plain transformers directory converted once from a
GGUF file, published by an atomic rename under a file lock so racing processes convert once and
a reader never sees half a model. Its marker (``lorakit-conversion.json``) records the conversion
version, the source GGUF's name and size, and every file's size: an entry that no longer matches
(a truncated or missing file, an older conversion, another source; ``model_cache_entries``)
is converted again.
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

from lorakit.errors import UserError
from lorakit.model_cache_entries import (
    CONVERSION_MARKER,
    CONVERSION_VERSION,
    entry_problem,
    error_gist,
    is_complete,
)

__all__ = [
    "CONVERSION_MARKER",
    "GgufReadError",
    "cache_root",
    "convert_gguf",
    "converted_directory",
    "entry_problem",
    "is_complete",
    "publish_directory",
]


def cache_root() -> Path:
    """The lorakit cache: ``$LORAKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lorakit`` or
    ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorakit"


def converted_directory(name: str, install: str, gguf_path: Path) -> Path:
    """``<cache>/models/<name>``, converted from the GGUF file on first use (process-safe), and
    again when the entry is damaged or stale (see ``entry_problem``); ``install``: the command
    that installs the package holding the file (for errors)."""
    target = cache_root() / "models" / name
    if is_complete(target, gguf_path):
        return target
    for module, command in (("gguf", install), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"converting '{name}' from GGUF needs the package '{module}'; "
                f"install it with: {command}"
            )
    from safetensors import SafetensorError

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.parent / f".{name}.lock") as locked:
            if not is_complete(target, gguf_path):  # another process may have finished first
                if locked:  # staging dirs left by killed conversions (no live one holds the lock)
                    for stale in target.parent.glob(f".{target.name}.tmp-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                _set_aside_damaged(target, gguf_path, locked)
                convert_gguf(gguf_path, target)
    except GgufReadError as error:
        raise UserError(
            f"cannot read the GGUF file '{gguf_path}' ({error}); it is missing or damaged. "
            f"Reinstall the package that provides it: {install}"
        ) from None
    except (OSError, SafetensorError) as error:  # not writable, a full disk, a read-only fs, ...
        raise UserError(
            f"cannot write the model cache at '{target.parent}' ({error_gist(error)}); "
            "free some space there or set LORAKIT_CACHE to a writable directory"
        ) from None
    return target


class GgufReadError(Exception):
    """Reading the source GGUF file failed (missing, unreadable, truncated): its message is the
    original error's gist."""


def _set_aside_damaged(target: Path, source: Path, locked: bool) -> None:
    """Move a damaged or stale entry out of the way (renamed to a staging name, then removed),
    so it is converted again; under the lock only, else refuse, naming the directory."""
    if not target.exists():
        return
    problem = entry_problem(target, source)
    refusal = f"model cache '{target}' is damaged or out of date ({problem}); "
    if not locked:
        raise UserError(refusal + f"delete {target} and run again")
    aside = target.parent / f".{target.name}.tmp-damaged-{os.getpid()}"
    try:
        os.rename(target, aside)
    except OSError as error:
        raise UserError(
            refusal + f"it cannot be replaced ({error_gist(error)}): delete {target} and run again"
        ) from None
    print(f"lorakit: {refusal}converting it again", file=sys.stderr)
    shutil.rmtree(aside, ignore_errors=True)


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

    Reading the GGUF file fails with ``GgufReadError`` (missing, unreadable or truncated);
    writing the cache with ``OSError`` or safetensors' ``SafetensorError`` (a full disk).
    """
    print(f"lorakit: converting {gguf_path.name} to {target} (once, ~30 s) ...", file=sys.stderr)
    import torch  # (here: ``lorakit --help`` reads this module's names without torch)

    if not gguf_path.is_file():
        raise GgufReadError("no such file")
    try:
        with torch.random.fork_rng(devices=[]):
            model, tokenizer = _dequantised_model(gguf_path)
    except Exception as error:  # a truncated file fails in numpy (ValueError), gguf, struct, ...
        raise GgufReadError(f"{type(error).__name__}: {error_gist(error)}") from error
    marker = {"source": gguf_path.name, "source_size": gguf_path.stat().st_size}
    publish_directory(target, marker, model.save_pretrained, tokenizer.save_pretrained)


def _dequantised_model(gguf_path: Path):
    """``(plain fp32 model, tokenizer with a pad token)`` read from the GGUF file."""
    import torch
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
    """Run each ``writer(staging_dir)``, make the files readable by all (``0644``/``0755`` less
    the umask, like the rest of ``~/.cache``: safetensors writes ``0600``), write the ``marker``
    JSON with ``version`` and ``files`` (each file's size) added, and rename the staging directory
    to ``target``. If another process published ``target`` first, ours is discarded; on any error
    the staging directory is removed and ``target`` is left untouched."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for write in writers:
            write(staging)
        files = _share_files(staging)
        marker = {**marker, "version": CONVERSION_VERSION, "files": files}
        (staging / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(staging / CONVERSION_MARKER, 0o666 & ~_umask())
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _share_files(directory: Path) -> dict[str, int]:
    """Set ``directory``'s tree to ``0755`` (folders) / ``0644`` (files), less the umask; returns
    each file's size by its relative path."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)  # mkdtemp makes it 0700
    sizes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        elif path.is_file():
            os.chmod(path, 0o666 & ~mask)
            sizes[path.relative_to(directory).as_posix()] = path.stat().st_size
    return sizes


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
