"""Shared pieces of the ``train``/``eval``/``generate``/``merge`` commands: settings merged from
defaults, a YAML/JSON config file and command-line flags (flags win), and model/data loading.

(Kept here, not in ``lorakit.commands``, because every module there is a subcommand.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from lorakit.errors import UserError

__all__ = ["TRAIN_DEFAULTS", "load_config_file", "load_examples_for", "merged_settings"]

# Every ``lorakit train`` setting and its default (the config file uses these keys).
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "data": None,
    "split": None,
    "eval_data": None,
    "eval_split": None,
    "style": None,
    "output": "lorakit-run",
    "target_modules": "all-linear",
    "r": 16,
    "alpha": 32.0,
    "dropout": 0.05,
    "lr": 2e-4,
    "steps": None,
    "epochs": 1.0,
    "batch_size": 8,
    "grad_accum": 1,
    "max_length": 256,
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "loraplus_ratio": None,
    "eval_every": 0,
    "checkpoint_every": 0,
    "keep_checkpoints": 2,
    "resume": False,
    "overwrite": False,
    "seed": 0,
    "gradient_checkpointing": False,
    "no_progress": False,
}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a ``.yaml``/``.yml``/``.json`` file (keys as in ``TRAIN_DEFAULTS``; dashes
    are accepted for underscores)."""
    from lorakit.data.formats import read_utf8

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = read_utf8(path, "config")
    try:
        if path.suffix.lower() == ".json":
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text)
    except (ValueError, Exception) as error:  # yaml.YAMLError and json.JSONDecodeError
        raise UserError(f"config file {path} cannot be parsed: {error}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of setting: value")
    settings = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    unknown = sorted(set(settings) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UserError(
            f"config file {path}: unknown setting(s) {unknown}; known: {', '.join(TRAIN_DEFAULTS)}"
        )
    return {key: _number(path, key, value) for key, value in settings.items()}


_FLOATS = {"alpha", "dropout", "lr", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm",
           "loraplus_ratio"}  # fmt: skip
_INTEGERS = {"r", "steps", "batch_size", "grad_accum", "max_length", "eval_every",
             "checkpoint_every", "keep_checkpoints", "seed"}  # fmt: skip


def _number(path: Path, key: str, value: Any) -> Any:
    """A numeric setting as its type. YAML 1.1 reads ``2e-4`` (no dot) as a string, so numeric
    strings are converted; anything else that is not a number is an error naming the key."""
    if value is None or (key not in _FLOATS and key not in _INTEGERS):
        return value
    kind = float if key in _FLOATS else int
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise UserError(f"config file {path}: {key}: {value!r} is not an integer")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(
            f"config file {path}: {key}: {value!r} is not a number"
            + (" (an integer)" if kind is int else "")
        ) from None


def merged_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file (``--config``), then every flag given on the command line
    (flags default to None, so only the ones given override)."""
    settings = dict(TRAIN_DEFAULTS)
    if getattr(args, "config", None):
        settings.update(load_config_file(args.config))
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if not settings["data"]:
        raise UserError("no training data: give --data SPEC (or 'data:' in the config file)")
    if not isinstance(settings["max_length"], int) or settings["max_length"] < 2:
        raise UserError(f"--max-length must be an integer >= 2, got {settings['max_length']!r}")
    output = Path(settings["output"])
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a directory (new or existing)")
    if isinstance(settings["target_modules"], str) and settings["target_modules"] != "all-linear":
        settings["target_modules"] = [m.strip() for m in settings["target_modules"].split(",")]
    return settings


def load_examples_for(spec: str, split: str | None, style: str | None, default_split: str):
    """Examples of ``spec``: built-in datasets default to ``default_split``, files to all rows."""
    from lorakit import data

    if split is None and spec in data.BUILTIN_DATASETS:
        split = default_split
    examples = data.load_examples(spec, split, style=style)
    if not examples:
        raise UserError(f"data '{spec}' (split {split or 'all'}) holds no examples")
    return examples
