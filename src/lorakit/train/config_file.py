"""``lorakit train --config FILE``: the settings a YAML or JSON file gives, typed as their
options (``load_config_file``), and how they combine with the defaults and the flags given on
the command line (``merged_values``). The keys are those of ``lorakit.train.settings``."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import Field
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.train.config import TrainingConfig, setting_fields, setting_key
from lorakit.train.settings import TrainSettings, option_fields, option_kind, setting_defaults

__all__ = ["load_config_file", "merged_values"]


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a ``.yaml``/``.yml``/``.json`` file, by key (dashes are accepted for
    underscores, and a flag's alias for its key: ``rank`` is ``r``); numbers written as strings
    (YAML 1.1 reads ``2e-4`` so) are converted."""
    from lorakit.data.formats import read_utf8

    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; --config takes a YAML or JSON file")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = read_utf8(path, "config")
    try:
        if path.suffix.lower() == ".json":
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text)
    except Exception as error:  # yaml.YAMLError, json.JSONDecodeError (a ValueError)
        raise UserError(f"config file {path} cannot be parsed: {error}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of setting: value")
    values = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    options = {setting_key(f): f for f in option_fields()}
    aliases = _alias_keys()
    unknown = sorted(set(values) - set(options) - set(aliases))
    if unknown:
        raise UserError(
            f"config file {path}: unknown setting(s) {unknown}; known: {', '.join(options)}"
            f" (and {', '.join(f'{a} for {k}' for a, k in aliases.items())})"
        )
    typed, given_as = {}, {}
    for key, value in values.items():
        setting = aliases.get(key, key)
        typed_value = _typed(path, key, value, options[setting])
        if setting in typed and typed[setting] != typed_value:
            raise UserError(
                f"config file {path}: {given_as[setting]}: {typed[setting]!r} and {key}: "
                f"{typed_value!r} are two values of one setting ({setting}); give one of them"
            )
        typed[setting], given_as[setting] = typed_value, key
    return typed


def _alias_keys() -> dict[str, str]:
    """``{alias key: setting key}`` of the flags' aliases (``--rank`` of ``--r``: ``rank`` ->
    ``r``): a config file may use either name, as the command line does."""
    return {
        alias[2:].replace("-", "_"): setting_key(option)
        for option in option_fields()
        for alias in option.metadata["aliases"]
    }


def _typed(path: Path, key: str, value: Any, option: Field) -> Any:
    """A config file's value as its setting's type: a number as ``_number``; a flag only as
    true/false (YAML's, JSON's), never a string such as "false"; a name or path as a string
    (or a list, where the setting takes one); ``null`` only for a setting that may be None
    (``steps``, ``eval_data``, ``max_grad_norm``: its type says so). Anything else is an error
    naming the key."""
    kind = option_kind(option)
    if value is None:
        if type(None) not in typing.get_args(_hint(option)):
            raise UserError(
                f"config file {path}: {key}: null is not {_expected(option, kind)}; leave the "
                f"key out for the default ({_shown_default(option)})"
            )
        return None
    if kind in (int, float):
        return _number(path, key, value, kind)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"config file {path}: {key}: {value!r} is not true or false")
        return value
    choices = option.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"config file {path}: {key}: {value!r} is not one of {', '.join(choices)}")
    takes_list = _takes_list(option)
    if isinstance(value, str) or (takes_list and isinstance(value, list)):
        return value  # (a list's items are checked by the setting: LoraConfig, token ids)
    raise UserError(
        f"config file {path}: {key}: {value!r} is not a string"
        + " or a list" * takes_list
        + " (quote it)" * isinstance(value, (int, float))
    )


def _expected(option: Field, kind: type) -> str:
    """What a setting's value must be, in words (for a message on a value it cannot take)."""
    if option.metadata.get("choices"):
        return "one of " + ", ".join(option.metadata["choices"])
    words = {int: "an integer", float: "a number", bool: "true or false"}
    return words.get(kind, "a string" + " or a list" * _takes_list(option))


def _shown_default(option: Field) -> str:
    """A setting's default as a config file writes it (``false``, ``lorakit-run``, ``0.05``)."""
    default = False if option.metadata["negated"] else option.default
    return str(default).lower() if isinstance(default, bool) else str(default)


def _hint(option: Field) -> Any:
    """The setting's declared type (``int | None``, ``str | list[str]``, ...)."""
    owner = TrainSettings if option in setting_fields(TrainSettings) else TrainingConfig
    return typing.get_type_hints(owner)[option.name]


def _takes_list(option: Field) -> bool:
    """The setting's type allows a list (``target_modules``, ``trainable_token_indices``)."""
    return any(typing.get_origin(kind) is list for kind in typing.get_args(_hint(option)))


def _number(path: Path, key: str, value: Any, kind: type) -> Any:
    """A numeric setting as its type; anything else that is not a number is an error naming
    the key."""
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise UserError(f"config file {path}: {key}: {value!r} is not an integer")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(
            f"config file {path}: {key}: {value!r} is not a number"
            + (" (an integer)" if kind is int else "")
        ) from None


_DIRECTORY_ACTIONS = ("resume", "overwrite")
"""Settings that say what to do with a run already in ``--output``: one choice, so a flag given
for either replaces the config file's values of both."""


def merged_values(config_file: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """``{key: value}``: the defaults, then the config file, then every ``given`` value that is
    not None (the flags given on the command line); ``target_modules`` as a list unless it is
    ``all-linear``. ``--resume`` or ``--overwrite`` on the command line sets aside the file's
    ``resume`` and ``overwrite`` (a ``train_settings.json`` of an older lorakit records
    ``overwrite: true`` for a run started with it, and ``--config`` it ``--resume`` continues
    that run)."""
    values = setting_defaults()
    if config_file:
        from_file = load_config_file(config_file)
        if any(given.get(key) for key in _DIRECTORY_ACTIONS):
            from_file = {k: v for k, v in from_file.items() if k not in _DIRECTORY_ACTIONS}
        values.update(from_file)
    values.update({key: given[key] for key in values if given.get(key) is not None})
    targets = values["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        values["target_modules"] = [name.strip() for name in targets.split(",")]
    return values
