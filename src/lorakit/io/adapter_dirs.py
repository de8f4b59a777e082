"""Where an adapter is read from: ``adapter_directory`` finds an adapter's directory as PEFT's
``from_pretrained`` / ``load_adapter`` look for it (``directory``, ``directory/subfolder``, or
``directory/<adapter_name>``), and says what was wrong where it finds none: a file given as the
directory, an adapter name the directory does not hold (listing those it holds), a missing
directory written like a Hugging Face Hub id (``hub_id_hint``: lorakit downloads nothing).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lorakit.errors import AdapterFileError
from lorakit.io.config_json import CONFIG_NAME
from lorakit.io.header import read_header, unreadable

__all__ = [
    "CONFIG_METADATA_KEY",
    "WEIGHTS_NAME",
    "adapter_directory",
    "hub_id_hint",
    "interrupted_save",
    "named_adapters_in",
]

WEIGHTS_NAME = "adapter_model.safetensors"
# lorakit also stores the config text inside the weights file (``read``): both are written
# together, and a save interrupted between its renames leaves the weights without the JSON.
CONFIG_METADATA_KEY = "lorakit.adapter_config"


def adapter_directory(
    directory: str | Path, adapter_name: str = "default", *, subfolder: str | None = None
) -> Path:
    """Where an adapter is read: ``directory`` (or ``directory/subfolder``), as PEFT's
    ``from_pretrained`` / ``load_adapter`` read it whatever the ``adapter_name`` (PEFT saves
    adapters other than "default" in ``directory/<name>``, read with ``subfolder=<name>``).
    Only where PEFT would find nothing, a ``directory/adapter_name`` holding an adapter is
    taken (e.g. ``DIR/default/``). Raises ``AdapterFileError`` naming what was looked for:
    for a file given as the directory, its directory to give instead; for a ``subfolder``
    missing in an existing ``directory``, the adapters that directory holds; the Hub hint
    (``hub_id_hint``) only where ``directory`` itself does not exist."""
    directory = Path(directory)
    candidate = directory / subfolder if subfolder else directory
    try:
        if (candidate / CONFIG_NAME).is_file() or interrupted_save(candidate):
            return candidate
        nested = candidate / adapter_name if adapter_name and not subfolder else None
        if nested is not None and ((nested / CONFIG_NAME).is_file() or interrupted_save(nested)):
            return nested
        found, given = _path_kind(candidate), _path_kind(directory)
    except OSError as error:  # e.g. a name too long for the file system
        raise unreadable(candidate, error) from None
    if found == "missing":
        raise _no_candidate_error(directory, candidate, subfolder, given)
    if found == "other":
        raise _not_a_directory_error(candidate)
    also = f" (nor in {nested})" if nested is not None else ""
    named = named_adapters_in(candidate)
    shown = ", ".join(str(candidate / name) for name in named[:3]) + ", ..." * (len(named) > 3)
    hint = (
        f"it holds adapters in subdirectories ({shown}; PEFT saves adapters other than "
        "'default' so, and `lorakit train --output` keeps its adapter in adapter/): give one of "
        "those directories (in Python also adapter_name=<name>, subfolder=<name> in peft)"
        if named
        else _trainer_checkpoint_hint(candidate)
        or "is this an adapter directory saved by lorakit or peft?"
    )
    raise AdapterFileError(f"no {CONFIG_NAME} in {candidate}{also}; {hint}")


def interrupted_save(directory: Path) -> bool:
    """True for a directory holding lorakit's ``adapter_model.safetensors`` (its header keeps
    the config: ``CONFIG_METADATA_KEY``) and no ``adapter_config.json``: a save that stopped
    between its renames (``atomic.write_files`` moves the old config out first, so PEFT refuses
    such a directory rather than pairing new weights with an old config), told by the
    temporary config it left beside them. ``read`` loads it with the config from the weights and
    a warning. Reads the safetensors header only."""
    path = directory / WEIGHTS_NAME
    if os.path.lexists(directory / CONFIG_NAME) or not path.is_file():  # (a broken link too)
        return False
    if not any(directory.glob(f".{CONFIG_NAME}.*.tmp")):  # (the config it was writing: a
        return False  # directory that never had one is no adapter, as for PEFT)
    try:
        return CONFIG_METADATA_KEY in read_header(path).metadata
    except (AdapterFileError, OSError):
        return False


_TRAINER_WEIGHTS = "model.safetensors"
_LORA_KEY = re.compile(r"(^|\.)lora_[A-Za-z_]+\.")


def _trainer_checkpoint_hint(directory: Path) -> str:
    """What to do where ``directory/model.safetensors`` holds LoRA tensors (a key with a
    ``lora_*`` component, e.g. ``...q_proj.lora_A.default.weight``): that is what
    ``transformers.Trainer`` writes (checkpoints, ``save_model``) for a model that is not a
    ``PreTrainedModel`` / ``peft.PeftModel``, the whole model's state dict, not an adapter.
    Reads the safetensors header only; "" for any other directory (or an unreadable file)."""
    path = directory / _TRAINER_WEIGHTS
    try:
        keys = read_header(path).tensors if path.is_file() else {}
    except (AdapterFileError, OSError):
        return ""
    if not any(_LORA_KEY.search(key) for key in keys):
        return ""
    return (
        f"{path} is a transformers.Trainer checkpoint (a whole model's state dict with the "
        "LoRA tensors inside, written by trainer.save_model() or save_strategy), not an "
        "adapter. To get the adapter, load it into the model it was trained as (the same "
        "lorakit.get_peft_model / lorakit.inject model): model.load_state_dict("
        f"safetensors.torch.load_file({str(path)!r}), strict=False), then "
        "lorakit.save_adapter(model, DIR, adapter_name) (or peft_model.save_pretrained(DIR)); "
        "or save adapters during training from a TrainerCallback.on_save."
    )


def _path_kind(path: Path) -> str:
    """What ``path`` is on disk: "dir", "missing" or "other" (a file, a device, ...)."""
    if path.is_dir():
        return "dir"
    return "other" if path.exists() else "missing"


def _no_candidate_error(
    directory: Path, candidate: Path, subfolder: str | None, given: str
) -> AdapterFileError:
    """The error for a missing ``candidate`` (``directory`` or ``directory/subfolder``), by
    what ``directory`` itself is (``given``, a ``_path_kind``): a file (give its directory),
    an existing directory (``subfolder`` names no adapter in it: list those it holds), or
    missing too (perhaps a Hub repository id: ``hub_id_hint``)."""
    if given == "other":
        return _not_a_directory_error(directory)
    if given == "dir" and subfolder:
        return _unknown_adapter_error(directory, subfolder)
    return AdapterFileError(
        f"adapter directory {candidate} does not exist.{hub_id_hint(directory)}"
    )


def _not_a_directory_error(path: Path) -> AdapterFileError:
    """The error for a ``path`` given as an adapter directory that is a file (e.g. the
    ``adapter_config.json`` itself): give its directory, where that holds an adapter."""
    try:
        head = (
            f"{path} is a file, not an adapter directory"
            if path.is_file()
            else f"{path} is not a directory"
        )
        parent_holds = (path.parent / CONFIG_NAME).is_file()
    except OSError:
        head, parent_holds = f"{path} is not a directory", False
    hint = (
        f"give its directory {path.parent} instead"
        if parent_holds
        else f"give the adapter directory, the one holding {CONFIG_NAME} and {WEIGHTS_NAME}"
    )
    return AdapterFileError(f"{head}; {hint}.")


def _unknown_adapter_error(directory: Path, name: str) -> AdapterFileError:
    """The error for an adapter ``name`` that the existing ``directory`` does not hold (no
    ``directory/name``): the adapters it does hold, "default" being ``directory`` itself as
    PEFT saves it, and how to pick one."""
    try:
        at_root = (directory / CONFIG_NAME).is_file()
    except OSError:
        at_root = False
    named = [n for n in named_adapters_in(directory) if not (at_root and n == "default")]
    held = (["default"] if at_root else []) + named
    missing = f"no adapter {name!r} in {directory} ({directory / name} does not exist)"
    if not held:
        return AdapterFileError(
            f"{missing}, and it holds no adapter ({CONFIG_NAME} neither in it nor in a "
            "subdirectory); is this an adapter directory saved by lorakit or peft?"
        )
    shown = ", ".join(
        "..." if n == "..." else f"{n!r} ({directory if n == 'default' else directory / n})"
        for n in held
    )
    root = f", 'default' being {directory} itself" if at_root else ""
    return AdapterFileError(
        f"{missing}; it holds {shown}: ask for one of them by name (`lorakit inspect "
        f"--adapter-name NAME`{root}; in Python subfolder=NAME to load it) or give that "
        "adapter's directory."
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_BARE_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_id_hint(directory: str | Path, *, bare_names: bool = False) -> str:
    """For a missing ``directory`` written like a Hugging Face Hub repository id
    (``owner/name``; with ``bare_names`` also one name token, as the Hub's legacy models have:
    ``gpt2``, ``t5-small``, ``bert-base-uncased``): how to fetch it, since lorakit reads only
    local directories (a missing adapter here, a missing model in
    ``lorakit.model_specs.resolve_model``, which passes ``bare_names`` after ruling out the
    built-in names); "" otherwise. Nothing is looked up: the hint is the name's shape only."""
    repo_id = directory if isinstance(directory, str) else directory.as_posix()
    if _HUB_ID.fullmatch(repo_id):
        return (
            f" {repo_id!r} looks like a Hugging Face Hub repository id: lorakit reads local "
            "directories only and downloads nothing at run time. Fetch it first with "
            f"huggingface_hub.snapshot_download({repo_id!r}) and pass the local directory it "
            "returns instead."
        )
    if bare_names and _BARE_HUB_ID.fullmatch(repo_id):
        return (
            f" If {repo_id!r} is a Hugging Face Hub model id, fetch it first with "
            f"huggingface_hub.snapshot_download({repo_id!r}) and pass the local directory it "
            "returns instead: lorakit reads local directories only and downloads nothing at "
            "run time."
        )
    return ""


def named_adapters_in(directory: Path, most: int = 8) -> list[str]:
    """The names of up to ``most`` subdirectories of ``directory`` holding an adapter config."""
    try:
        names = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
    except OSError:
        return []
    return names[:most] + (["..."] if len(names) > most else [])
