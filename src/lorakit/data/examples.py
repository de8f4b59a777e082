"""Training examples: a prompt/completion pair, or a chat (``messages``) rendered by the model's
chat template. Loss is taken only on the completion / assistant turns.

Classification data carries ``choices`` (the candidate answers, e.g. ``("positive", "negative")``)
and ``label`` (the index of the right one), so the same examples train a causal LM and score it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ROLES",
    "SPLITS",
    "Example",
    "chat_classification_example",
    "check_split",
    "normalize_text",
    "plain_classification_example",
    "select_split",
    "split_of",
    "stable_digest",
]

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
# Fixed split fractions (per mille of the hash space): 80% train, 10% validation, 10% test.
_SPLIT_BOUNDS = ((800, "train"), (900, "validation"), (1000, "test"))


@dataclass(frozen=True)
class Example:
    """One example. Exactly one form is used:

    - plain: ``prompt`` + ``completion`` (the model learns ``completion`` then EOS given ``prompt``;
      an empty completion: the EOS alone);
    - chat: ``messages`` = ``({"role": ..., "content": ...}, ...)``; every assistant turn is learnt.

    ``choices``/``label``/``text``: for classification, the candidate answers (plain: completions
    such as ``" positive"``; chat: assistant contents such as ``"positive"``), the right one's
    index, and the raw text before templating (for sequence-classification models).
    ``source`` says where the example came from (``file.jsonl:12``), for error messages.
    """

    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, str], ...] = ()
    choices: tuple[str, ...] = ()
    label: int | None = None
    text: str = ""
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    @property
    def answer(self) -> str:
        """The learnt answer: the completion, or the last assistant message's content."""
        if not self.is_chat:
            return self.completion
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")


def plain_classification_example(
    text: str, label: int, label_words: Sequence[str], template: str, source: str = ""
) -> Example:
    """``prompt = template.format(text=text)``, ``completion = " " + label_words[label]``."""
    choices = tuple(" " + word for word in label_words)
    return Example(
        prompt=template.format(text=text),
        completion=choices[label],
        choices=choices,
        label=label,
        text=text,
        source=source,
    )


def chat_classification_example(
    text: str, label: int, label_words: Sequence[str], instruction: str, source: str = ""
) -> Example:
    """user: ``instruction.format(text=text)``; assistant: ``label_words[label]``."""
    messages = (
        {"role": "user", "content": instruction.format(text=text)},
        {"role": "assistant", "content": label_words[label]},
    )
    return Example(
        messages=messages, choices=tuple(label_words), label=label, text=text, source=source
    )


def normalize_text(text: str) -> str:
    """Lower case, whitespace collapsed: the key for deduplication and splitting."""
    return re.sub(r"\s+", " ", text).strip().lower()


def stable_digest(text: str) -> str:
    """SHA-256 of the normalised text: stable across runs, machines and Python versions."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def split_of(key: str) -> str:
    """The fixed split (``train`` 80% / ``validation`` 10% / ``test`` 10%) of a text key.

    Decided by the key's hash alone, so duplicates (after normalisation) always share a split.
    """
    bucket = int(stable_digest(key)[:12], 16) % 1000
    return next(name for bound, name in _SPLIT_BOUNDS if bucket < bound)


def check_split(split: str | None) -> None:
    from lorakit.errors import UserError

    if split not in (None, "all", *SPLITS):
        raise UserError(f"unknown split '{split}'; choose one of: all, {', '.join(SPLITS)}")


def select_split(
    examples: Iterable[Example], keys: Iterable[str], split: str | None
) -> list[Example]:
    """The examples whose key falls in ``split`` (``None``/``"all"``: every example)."""
    check_split(split)
    pairs = list(zip(examples, keys, strict=True))
    if split in (None, "all"):
        return [example for example, _ in pairs]
    return [example for example, key in pairs if split_of(key) == split]
