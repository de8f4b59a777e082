"""Exceptions with messages meant for people: what was wrong and what to do instead."""

from __future__ import annotations

__all__ = [
    "AdapterFileError",
    "AdapterNamesError",
    "BaseModelMismatchError",
    "FanInFanOutWarning",
    "TargetModulesError",
    "UnknownAdapterError",
    "UnusedTargetWarning",
    "UserError",
    "first_line",
    "listed",
]


class UserError(Exception):
    """Bad input from a user (argument, file, spec). The CLI prints it as one line, exit code 2."""


class AdapterFileError(UserError, ValueError):
    """An adapter directory or file that cannot be read or does not fit the model."""


class BaseModelMismatchError(AdapterFileError):
    """The adapter was trained on different base weights than the model it is loaded onto."""


class FanInFanOutWarning(UserWarning):
    """PEFT's warning that ``fan_in_fan_out`` is set to the layout of the layers adapted (the
    ``lorakit`` command chooses no ``fan_in_fan_out``, so it does not show this warning)."""


class UnusedTargetWarning(UserWarning):
    """A targeted module that the model's forward never calls, so its adapter changes no
    output and trains nothing: T5's and BART's ``shared`` embedding, whose weight transformers 5
    ties into the separate ``encoder``/``decoder.embed_tokens`` modules that the forward reads
    (PEFT 0.21 adapts it the same way, without a word). The adapter is still added and saved
    as PEFT saves it; the message names the modules to target instead."""


class UnknownAdapterError(KeyError, ValueError):
    """An adapter name the model does not hold. A ``KeyError`` (a name lookup) and, as PEFT
    raises for it, a ``ValueError``; its text is the message, without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterNamesError(TypeError, ValueError):
    """A mixed batch (``adapter_names=``, one adapter per row) lorakit cannot run as asked: a
    string instead of a list of names, or an adapter its per-row routing does not cover. A
    ``ValueError``, as PEFT raises for these, and a ``TypeError``, as lorakit raised before."""


class TargetModulesError(UserError, ValueError):
    """A ``target_modules`` list with entries that name no module of the model (a typo)."""


def listed(names, limit: int) -> str:
    """``names`` sorted, for a message: the first ``limit`` joined by commas, then
    ``" ... (N in all)"`` when there are more."""
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def first_line(error: BaseException, limit: int) -> str:
    """The gist of ``error`` for a one-line message: the first line of its text, at most
    ``limit`` characters; its type's name when it has no text."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
