"""``save_merged_model``: the active adapters merged into the weights and saved as a plain
transformers directory (``AutoModel*.from_pretrained`` loads it without lorakit), crash-safe: a
save killed at any moment leaves the old model, the new one, or a directory without
``config.json``, and a save that fails leaves the old model whole (``_move_in``); ``lorakit
merge`` writes through it."""

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
from lorakit.io.save_lock import directory_locked
from lorakit.state import adapter_configs, adapter_model
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


def _stale_weights(directory: Path, written: set[str]) -> list[Path]:
    """Weight files of an earlier save (e.g. other shards) that the new save did not write, which
    ``_move_in`` takes out as ``save_pretrained`` removes them: left behind they could be loaded
    instead of the new ones. Only real weight file names (``_is_weight_file``), nothing else of
    the user's."""
    return [
        path
        for path in sorted(directory.iterdir())
        if _is_weight_file(path.name) and path.name not in written and path.is_file()
    ]


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
    transformers directory (``AutoModel*.from_pretrained`` loads it without lorakit). The
    adapters are chosen as ``lorakit.merge_and_unload`` chooses them: a ``PeftModel``'s active
    ones also after ``disable_adapter_layers`` (as PEFT merges them); a model with none active
    and none merged is refused (``ValueError``, before any change: it would save the base).

    The model is changed in place (it becomes the merged plain model) and returned; for
    lorakit's ``PeftModel``, the model inside it (whose own ``save_pretrained`` writes
    adapters, none once merged). ``directory`` is checked first (``SaveError`` for a file or
    an unwritable place, before the merge). Where the merge untied tied weights, each module
    that transformers would leave out of the files and not tie back to the same tensor on
    reload gets its own copy of it (``unload.own_tensors_for_reload``, as ``merge_and_unload``
    does): the saved directory reloads with this model's outputs (e.g. BART or T5 with LoRA on
    their embeddings). Files are written to a staging folder ``.lorakit-staging.<random>.tmp``
    INSIDE ``directory`` (the same file system, even where ``directory`` is a mount point or a
    link to another disk), given the permissions of any new file there (``0666 & ~umask``),
    fsynced, and moved in by ``_move_in`` under the directory's save lock (``save_lock``): a
    crash at any moment leaves ``directory`` holding the complete old model, the complete new
    one, or no ``config.json`` (transformers refuses to load it; merging again completes it),
    never new weights beside an old config or the reverse; an error leaves the old model whole.
    The staging folder of a killed save is removed by the next save (``_remove_stale_staging``).
    A file system refusal is a ``SaveError`` naming ``directory``; a failed save into a new
    ``directory`` removes it and the parent folders it made (``_missing_folders``).
    """
    from lorakit.merge import merge_and_unload

    target = Path(directory)
    refuse_adapter_directory(target)
    atomic.check_output_directory(target, "the merged model", writable=True)
    if adapter_configs(model):  # (a PeftModel given whole: merge_and_unload takes its choice)
        model = merge_and_unload(model)  # (for lorakit's PeftModel, the model inside it)
    else:  # (merged earlier: merge_and_unload did this, but a model merged otherwise may not)
        model = adapter_model(model)
        own_tensors_for_reload(model)
    made = _missing_folders(target)
    try:
        _save(model, target, tokenizer)
    except Exception as error:
        _remove_empty(made)  # (the output directory and the parents this save made)
        if not isinstance(error, OSError) and type(error).__name__ != "SafetensorError":
            raise
        raise atomic.save_failure(error, target, "the merged model") from error
    return model


def _missing_folders(target: Path) -> list[Path]:
    """The folders that do not exist yet on the way to ``target``, ``target`` first: those the
    save makes (``mkdir(parents=True)``), and ``_remove_empty`` removes after a failure."""
    missing: list[Path] = []
    folder = target.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; stop at the first that is not
    (it holds something of another process's, and so do its parents)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _save(model: nn.Module, target: Path, tokenizer: object | None) -> None:
    """Stage ``model`` (and ``tokenizer``) in a folder inside ``target`` and move it in."""
    target.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent, f".{target.name}.")  # (beside: an older lorakit's)
    with directory_locked(target):
        _remove_stale_staging(target, _STAGING_PREFIX)  # (a killed save's copy may fill the disk)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=_STAGING_SUFFIX, dir=target))
        try:
            model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            staged = sorted(staging.iterdir())
            _refuse_incomplete(staged, target)
            mode = atomic.new_file_mode(target)  # save_pretrained writes weights 0600 (mkstemp)
            for path in staged:
                if path.is_file():
                    path.chmod(mode)
                    atomic.sync(path)  # on the disk before it replaces the old file
            _move_in(staged, target, staging / _ASIDE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _refuse_incomplete(staged: list[Path], target: Path) -> None:
    """``UserError`` (nothing in ``target`` touched) when ``save_pretrained`` staged no
    ``config.json`` or no weight file: moving that in would remove the old model's weights."""
    names = sorted(path.name for path in staged)
    if _MODEL_CONFIG_NAME not in names or not any(_is_weight_file(name) for name in names):
        raise UserError(
            f"the model's save_pretrained wrote {names or 'nothing'}, not a transformers model "
            f"(config.json and weights); nothing in {target} was changed. save_merged_model "
            "saves a transformers model (PreTrainedModel) with or without lorakit adapters"
        )


# The file that makes a directory a transformers model: without it ``from_pretrained`` refuses
# the directory ("Unrecognized model"), whatever weight files it holds.
_MODEL_CONFIG_NAME = "config.json"
# Staging folders are ``.lorakit-staging.<8 characters of tempfile.mkdtemp>.tmp`` inside the
# output; ``_ASIDE`` in one holds the old files taken out of the output.
_STAGING_PREFIX = ".lorakit-staging."
_STAGING_SUFFIX = ".tmp"
_ASIDE = "previous"


def _move_in(staged: list[Path], target: Path, aside: Path) -> None:
    """Move the ``staged`` files of a new save into ``target`` (which may hold an earlier save)
    so that no crash between two steps leaves a mix of the two saves that loads, and an error
    leaves the earlier save whole. With Ctrl-C held back (``base_rewrite.interrupts_held``):

    1. the old ``config.json`` is moved into ``aside`` (in the staging folder): from here on
       the directory does not load;
    2. the other old files the new save replaces, and the earlier save's weight files it does
       not write (``_stale_weights``: left beside the new config, a stale ``model.safetensors``
       would be loaded instead of new shards), are moved into ``aside``;
    3. every new file but ``config.json`` is moved in, the new ``config.json`` last.

    A crash before 1 leaves the old model complete, after 3 the new one, and in between a
    directory without ``config.json``. The directory is fsynced after each step, so that the
    same order holds after a power cut. An error undoes the moves made (``_undo``), the old
    ``config.json`` back last. Files of the user's are never touched.
    """
    from lorakit.base_rewrite import interrupts_held

    written = {path.name for path in staged}
    config = [path for path in staged if path.name == _MODEL_CONFIG_NAME]
    others = [path for path in staged if path.name != _MODEL_CONFIG_NAME]
    replaced = [target / path.name for path in others if _is_file(target / path.name)]
    steps = [
        [(path, aside / path.name) for path in [target / _MODEL_CONFIG_NAME] if _is_file(path)],
        [(path, aside / path.name) for path in replaced + _stale_weights(target, written)],
        [(path, target / path.name) for path in others],
        [(path, target / path.name) for path in config],
    ]
    done: list[tuple[Path, Path]] = []
    with interrupts_held():
        try:
            aside.mkdir()
            for step in steps:
                for source, destination in step:
                    os.replace(source, destination)
                    done.append((source, destination))
                atomic.sync_directory(target)
        except BaseException:
            _undo(done)
            raise


def _is_file(path: Path) -> bool:
    """A file (or a link) at ``path``: what a new file replaces; never a folder of the user's."""
    return path.is_symlink() or path.is_file()


def _undo(done: list[tuple[Path, Path]]) -> None:
    """Move each file of ``done`` back, the last move first, so that the old ``config.json``
    (the first moved) comes back last: stopped by an error, the directory is left without it
    (refused by transformers), never a mix that loads."""
    for source, destination in reversed(done):
        try:
            os.replace(destination, source)
        except OSError:
            return


def _remove_stale_staging(folder: Path, prefix: str) -> None:
    """Remove the staging folders in ``folder`` of earlier saves that were killed before they
    cleaned up (each a full copy of a model): folders named ``<prefix><8 characters>.tmp``, as
    ``save_merged_model`` names them (now inside the output; an older lorakit, beside it),
    where nothing changed for a minute (``atomic.is_stale``, the rule for a killed adapter
    save's temporary files), so a save still writing its own is left alone. A folder that
    cannot be removed (permissions) is left, without an error."""
    name = re.compile(rf"{re.escape(prefix)}[a-z0-9_]{{8}}{re.escape(_STAGING_SUFFIX)}")
    leftovers: list[Path] = []
    with contextlib.suppress(OSError):  # (a folder that cannot be listed: nothing to clean)
        leftovers = [path for path in folder.iterdir() if name.fullmatch(path.name)]
    for leftover in leftovers:
        if leftover.is_dir() and not leftover.is_symlink() and atomic.is_stale(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
