"""What may name a served adapter: 1-128 letters, digits, ``.``, ``_``, ``-``, starting with a
letter or digit, without ``..`` (``valid_name``, ``NAME_RULE``), so that a name is also a safe
subdirectory of the adapter directory; ``AdapterNameError`` for a runtime name that breaks it
(or is reserved), and ``bad_directory_name``: why a directory is skipped at start-up.
"""

from __future__ import annotations

import re

from lorakit.errors import UserError

__all__ = ["NAME_RULE", "AdapterNameError", "bad_directory_name", "valid_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


def valid_name(name: object) -> bool:
    """Whether ``name`` may name an adapter: ``NAME_RULE``."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and ".." not in name


class AdapterNameError(UserError):
    """A runtime adapter name that is malformed, or reserved (the base model's name)."""


def bad_directory_name(name: str) -> str:
    """Why the adapter directory ``name`` is not served at start-up, and the ways out."""
    return (
        f"its directory name {name[:200]!r} is not a valid adapter name ({NAME_RULE}); rename "
        "the directory, or load it with /v1/load_lora_adapter lora_name=<valid name> "
        "lora_path=<the directory name>."
    )
