"""A labelled CSV file's answer words: ``label_words`` checked and turned into
``{raw label: answer word}``.

``label_words`` is a dict from the raw labels of the file's label column to answer words, or a
list of the allowed raw labels in choice order (each its own answer word); by default the
distinct labels of the file, sorted. CSV labels are read as text, so integer keys or list
entries (a model config's ``id2label``, ``{0: "negative", 1: "positive"}``, or ``[0, 1]``) are
converted with ``str()``: the key ``0`` stands for the label ``0`` in the file. Answer words
must be non-empty strings (they are the text the model learns to answer).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorakit.errors import UserError

__all__ = ["LabelWords", "answer_words"]

LabelWords = Mapping[str | int, str] | Sequence[str | int]
_SAME = object()  # a listed label's answer word: the label itself


def answer_words(
    label_words: LabelWords | None, values: list[str], path: Path, label_column: str
) -> tuple[dict[str, str], list[str]]:
    """``(word_of, words)``: each raw label's answer word, and the distinct answer words in
    choice order, for a file whose distinct labels are ``values`` (sorted). ``UserError`` when
    there would be fewer than two answer words (one choice scores 100% for any model) and for
    ``label_words`` that are not a dict or list of labels with non-empty string answer words."""
    if label_words is None and len(values) < 2:
        raise UserError(
            f"{path}: every row has the label {values[0]!r} (column '{label_column}'), so the "
            "only choice would be that word and any model would score 100%; add rows of the "
            "other class(es), or name every class from Python: lorakit.data.load_examples("
            f"'{path}', label_words=[{values[0]!r}, '<other class>']) (label_words has no "
            "lorakit train flag)"
        )
    word_of = (
        {value: value for value in values} if label_words is None else _mapping(label_words, path)
    )
    words = list(dict.fromkeys(word_of.values()))
    if len(words) < 2:
        raise UserError(
            f"{path}: label_words {label_words!r} give the answer words {words}; give at least "
            "two, one per class (a single choice scores 100% for any model)"
        )
    return word_of, words


def _mapping(label_words: LabelWords, path: Path) -> dict[str, str]:
    """``{str(raw label): answer word}`` of a dict or a list of labels (module docstring);
    errors name ``path``, the file they are for."""
    if isinstance(label_words, str) or not isinstance(label_words, Mapping | Sequence):
        raise UserError(  # (a string's letters would be the labels; a set has no fixed order)
            f"{path}: label_words {label_words!r} is a {type(label_words).__name__}; give a dict "
            "{raw label: answer word} or a list of the labels, e.g. ['negative', 'positive']"
        )
    if isinstance(label_words, Mapping):
        pairs = [(key, word, f"label_words[{key!r}]") for key, word in label_words.items()]
    else:  # each label is its own answer word
        pairs = [(key, _SAME, f"label_words[{index}]") for index, key in enumerate(label_words)]
    word_of: dict[str, str] = {}
    for key, given, name in pairs:
        label = _label(key, f"{path}: {name}")
        word = _answer_word(label if given is _SAME else given, f"{path}: {name}")
        if word_of.setdefault(label, word) != word:
            raise UserError(
                f"{path}: {name}: the label {label!r} is given twice, with the answer words "
                f"{word_of[label]!r} and {word!r} (int keys count as their str()); keep one"
            )
    return word_of


def _label(key: object, name: str) -> str:
    """A raw label as the CSV reader reads it: a string as it is, an integer as ``str(key)``."""
    if isinstance(key, str):
        return key
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return str(key)
    raise UserError(
        f"{name}: the label {key!r} ({type(key).__name__}) is not a string or an integer; give "
        "the labels as they are written in the file's label column"
    )


def _answer_word(word: object, name: str) -> str:
    """``word`` if it is a non-empty string; else ``UserError`` naming ``name`` and ``word``."""
    if isinstance(word, str) and word.strip():
        return word
    raise UserError(
        f"{name} is {word!r} ({type(word).__name__}); an answer word must be a non-empty "
        "string, the text the model learns to answer (e.g. {0: 'negative', 1: 'positive'})"
    )
