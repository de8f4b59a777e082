"""Data fixes (review 34): CSV ``label_words`` with integer keys or entries (a model's
``id2label``) stand for their ``str()`` and non-string answer words are a ``UserError`` naming
the key (they gave a misleading "not one of [0, 1]" or a raw ``TypeError``); a piece whose
first token spans the cut no longer gets a Llama-2 style tokenizer's "▁" of its own (a prompt
ending in a space trained ``'▁' '▁negative'``, a double space); a JSONL record missing its
completion says so, and TRL's conversational prompt/completion records point to ``messages``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import data
from lorakit.data.examples import Example
from lorakit.data.segments import _joined_segments, _tokens_continuing
from lorakit.errors import UserError
from tests import tiny_tokenizer
from tests.test_data_fixes import learnt_tokens, legacy_tokenizer


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "intlab.csv"
    path.write_text("text,label\ngreat film,1\nawful,0\n", encoding="utf-8")
    return path


# ------------------------------------------------------------- 1: label_words with int keys


def test_int_keys_of_label_words_stand_for_the_labels_as_text(tmp_path: Path) -> None:
    id2label = {0: "negative", 1: "positive"}
    examples = data.load_examples(_csv(tmp_path), label_words=id2label)
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("Text: great film\nLabel:", " positive", 1),
        ("Text: awful\nLabel:", " negative", 0),
    ]
    assert examples[0].choices == (" negative", " positive")
    chat = data.load_examples(_csv(tmp_path), label_words=id2label, style="chat")
    assert [e.answer for e in chat] == ["positive", "negative"]


def test_int_list_of_label_words_lists_the_labels_as_text(tmp_path: Path) -> None:
    examples = data.load_examples(_csv(tmp_path), label_words=[1, 0])
    assert [(e.completion, e.label, e.choices) for e in examples] == [
        (" 1", 0, (" 1", " 0")),
        (" 0", 1, (" 1", " 0")),
    ]


@pytest.mark.parametrize(
    ("label_words", "named"),
    [
        ({"0": 0, "1": 1}, "label_words['0'] is 0 (int)"),
        ({"0": "negative", "1": None}, "label_words['1'] is None (NoneType)"),
        ({0: "negative", 1: " "}, "label_words[1] is ' ' (str)"),
        (["0", None], "label_words[1]: the label None (NoneType)"),
    ],
)
def test_answer_words_that_are_not_non_empty_strings_are_refused(
    tmp_path: Path, label_words: object, named: str
) -> None:
    with pytest.raises(UserError) as caught:
        data.load_examples(_csv(tmp_path), label_words=label_words)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'intlab.csv'}: {named}")
    assert "non-empty string" in message or "string or an integer" in message


def test_an_int_key_and_its_str_with_different_words_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"the label '1' is given twice.*'positive' and 'good'"):
        data.load_examples(_csv(tmp_path), label_words={0: "negative", 1: "positive", "1": "good"})


def test_label_words_as_one_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"label_words '01' is a str; give a dict"):
        data.load_examples(_csv(tmp_path), label_words="01")


# ---------------------------------------------- 2: a token spanning the prompt/completion cut

PROMPT = "Review: a dull, lifeless mess. Sentiment: "  # ends in a space: '▁Sentiment:' '▁'


def test_a_piece_after_a_cut_token_gets_no_space_token_of_its_own() -> None:
    tok = legacy_tokenizer()
    joint = tok(PROMPT + "negative" + tok.eos_token)["input_ids"]
    assert tok.convert_ids_to_tokens(joint[-3:]) == ["▁Sentiment:", "▁negative", "</s>"]
    input_ids, labels, _ = data.tokenize_example(Example(PROMPT, "negative"), tok, 100)
    assert input_ids[: len(tok(PROMPT)["input_ids"])] == tok(PROMPT)["input_ids"]
    assert learnt_tokens(tok, input_ids, labels) == ["neg", "ative", "</s>"]  # was '▁negative'
    spelled = "".join(tok.convert_ids_to_tokens(input_ids)).replace("▁", " ")
    assert spelled == "".join(tok.convert_ids_to_tokens(joint)).replace("▁", " ")
    assert spelled == f"<s> {PROMPT}negative</s>"  # the joint text: no second space


def test_a_chat_piece_after_a_cut_token_gets_no_space_token_of_its_own() -> None:
    tok = legacy_tokenizer()
    segments = _joined_segments(tok, [(PROMPT, False), ("negative", True)])
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert segments == [(prompt, False), (tok.convert_tokens_to_ids(["neg", "ative"]), True)]


@pytest.mark.parametrize("piece", ["negative", " negative", "\n\nParis", "  two spaces", "'s"])
def test_byte_level_pieces_after_the_anchor_are_the_pieces_alone(piece: str) -> None:
    tiny = tiny_tokenizer.build()
    assert _tokens_continuing(tiny, piece) == tiny(piece, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ 3: JSONL prompt/completion


def _jsonl(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_missing_completion_is_named_missing(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(UserError) as caught:
        data.load_examples(path)
    assert str(caught.value).startswith(f"{path}:2: missing key 'completion'")
    assert "None" not in str(caught.value)


def test_trl_conversational_prompt_completion_points_to_messages(tmp_path: Path) -> None:
    question = "What is 2+2? " * 40
    record = {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    with pytest.raises(UserError) as caught:
        data.load_examples(_jsonl(tmp_path, [record]))
    message = str(caught.value)
    assert "'prompt' is a list of messages" in message
    assert 'lorakit reads a chat as {"messages": [...]}' in message
    assert question not in message and len(message) < 400  # the value shortened


def test_other_non_string_values_are_shortened(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "completion": list(range(1000))}])
    with pytest.raises(
        UserError, match=r"'completion' must be a string, got \[0, 1, 2, .*\.\.\.\]"
    ):
        data.load_examples(path)
