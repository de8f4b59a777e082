"""``save_merged_model``: the active adapters merged into the weights and saved as a plain
transformers directory (``AutoModel*.from_pretrained`` loads it without lorakit), crash-safe: a
save killed at any moment leaves the old model, the new one, or a directory without
``config.json`` (``_move_in``); ``lorakit merge`` writes through it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from torch import nn

from lorakit.errors import UserError
from lorakit.io import atomic
from lorakit.io.config_json import CONFIG_NAME
from lorakit.state import adapter_configs
from lorakit.unload import own_tensors_for_reload

__all__ = ["refuse_adapter_directory", "save_merged_model"]


_WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_WEIGHT_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")


def _is_weight_file(name: str) -> bool:
    """True for the name of a transformers weight file (one above, or a numbered shard); never
    for a user's file that merely starts like one (``model_backup.safetensors``)."""
    return name in _WEIGHT_FILE_NAMES or _WEIGHT_SHARD.fullmatch(name) is not None


def _remove_stale_weights(directory: Path, written: set[str]) -> None:
    """Weight files of an earlier save (e.g. other shards) that the new save did not write, as
    ``save_pretrained`` removes them: left behind they could be loaded instead of the new ones.
    Only real weight file names (``_is_weight_file``) are removed, nothing else of the user's."""
    for path in directory.iterdir():
        if _is_weight_file(path.name) and path.name not in written and path.is_file():
            path.unlink()


def refuse_adapter_directory(directory: str | os.PathLike[str]) -> None:
    """``UserError`` when ``directory`` holds an adapter (``adapter_config.json``): a merged
    model saved there would get the adapter again whenever transformers loads it. The merge
    command checks this before it loads anything."""
    target = Path(directory)
    if (target / CONFIG_NAME).is_file():
        raise UserError(
            f"{target} holds an adapter ({CONFIG_NAME}): transformers would apply it again on "
            "top of the merged weights whenever it loads the model; save the merged model into "
            "another directory"
        )


def save_merged_model(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: object | None = None
) -> nn.Module:
    """Merge the active adapters into the weights, remove every lorakit module and save a plain
    transformers directory (``AutoModel*.from_pretrained`` loads it without lorakit).

    The model is changed in place (it becomes the merged plain model) and returned. Where the
    merge untied tied weights, each module that transformers would leave out of the files and
    not tie back to the same tensor on reload gets its own copy of it
    (``unload.own_tensors_for_reload``, as ``merge_and_unload`` does): the saved directory
    reloads with this model's outputs (e.g. BART or T5 with LoRA on their embeddings). Files are
    written to a staging folder ``.<name>.<random>.tmp`` beside ``directory``, given the
    permissions of any new file there (``0666 & ~umask``), fsynced, and moved in by
    ``_move_in``: a crash at any moment leaves ``directory`` holding the complete old model, the
    complete new one, or no ``config.json`` (transformers refuses to load it; merging again
    completes it), never new weights beside an old config or the reverse. The staging folder of
    a killed save is removed by the next save beside it (``_remove_stale_staging``).
    """
    from lorakit.merge import merge_and_unload

    target = Path(directory)
    refuse_adapter_directory(target)
    if adapter_configs(model):
        model = merge_and_unload(model)
    else:  # (merged earlier: merge_and_unload did this, but a model merged otherwise may not)
        own_tensors_for_reload(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)  # (first: a killed save's copy may be what fills the disk)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_STAGING_SUFFIX, dir=target.parent)
    )
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        target.mkdir(exist_ok=True)
        staged = sorted(staging.iterdir())
        mode = atomic.new_file_mode(target)  # save_pretrained writes weights 0600 (mkstemp)
        for path in staged:
            if path.is_file():
                path.chmod(mode)
                atomic.sync(path)  # on the disk before it replaces the old file
        _move_in(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


# The file that makes a directory a transformers model: without it ``from_pretrained`` refuses
# the directory ("Unrecognized model"), whatever weight files it holds.
_MODEL_CONFIG_NAME = "config.json"
# Staging folders are ``.<output name>.<8 characters of tempfile.mkdtemp>.tmp``.
_STAGING_SUFFIX = ".tmp"


def _move_in(staged: list[Path], target: Path) -> None:
    """Move the ``staged`` files of a new save into ``target`` (which may hold an earlier save)
    so that no crash between two steps leaves a mix of the two saves that loads:

    1. the old ``config.json`` is removed: from here on the directory does not load;
    2. every new file but ``config.json`` is moved in (``os.replace``), then the earlier save's
       weight files that the new one did not write are removed (``_remove_stale_weights``:
       left beside the new config, a stale ``model.safetensors`` would be loaded instead of new
       shards);
    3. the new ``config.json`` is moved in last.

    A crash before 1 leaves the old model complete, after 3 the new one, and in between a
    directory without ``config.json``. The directory is fsynced after each step, so that the
    same order holds after a power cut. Files of the user's are never touched.
    """
    config = [path for path in staged if path.name == _MODEL_CONFIG_NAME]
    if config:  # (save_pretrained always writes one)
        (target / _MODEL_CONFIG_NAME).unlink(missing_ok=True)
        atomic.sync_directory(target)
    for path in staged:
        if path.name != _MODEL_CONFIG_NAME:
            os.replace(path, target / path.name)
    _remove_stale_weights(target, {path.name for path in staged})
    atomic.sync_directory(target)
    for path in config:
        os.replace(path, target / path.name)
    atomic.sync_directory(target)


def _remove_stale_staging(target: Path) -> None:
    """Remove the staging folders of earlier saves into ``target`` that were killed before they
    cleaned up (each a full copy of a model): folders beside ``target`` named as
    ``save_merged_model`` names them, where nothing changed for a minute (``atomic.is_stale``,
    the rule for a killed adapter save's temporary files), so a save still writing its own is
    left alone. A folder that cannot be removed (permissions) is left, without an error."""
    name = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}{re.escape(_STAGING_SUFFIX)}")
    leftovers: list[Path] = []
    with contextlib.suppress(OSError):  # (a parent that cannot be listed: nothing to clean)
        leftovers = [path for path in target.parent.iterdir() if name.fullmatch(path.name)]
    for leftover in leftovers:
        if leftover.is_dir() and not leftover.is_symlink() and atomic.is_stale(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
