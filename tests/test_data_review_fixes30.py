"""Data fixes (review 30): ``--style`` reaches built-ins and CSV files only, not a JSONL
``--eval-data`` file; a chat turn whose end-of-turn token is not EOS is learnt up to that token
(not the newline after it); a whitespace-only prompt does not put every row in one split;
shortening a review that is also in its label word does not crash; a CSV row with too few
fields is named by its field count, an empty field by its column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import data
from lorakit.cli import main
from lorakit.data.chat import render_chat
from lorakit.data.examples import Example, chat_classification_example, split_of
from lorakit.errors import UserError
from lorakit.train.settings import load_examples_for
from tests import tiny_tokenizer

RECORDS = [{"prompt": f"Question {i}?\nAnswer:", "completion": f" answer {i}"} for i in range(6)]


class Reached(Exception):
    """Raised by a stand-in for the model loading: the data was loaded without an error."""


def _files(tmp_path: Path) -> tuple[Path, Path]:
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\ngreat film,positive\ndull film,negative\n", encoding="utf-8")
    return jsonl, csv


# 1. --style goes to built-ins and CSV files, never to a JSONL file


def test_style_is_given_to_csv_and_builtins_not_to_a_jsonl_eval_file(tmp_path):
    jsonl, csv = _files(tmp_path)
    examples = load_examples_for(str(jsonl), None, "plain", "validation")  # was: UserError
    assert [(e.prompt, e.completion) for e in examples] == [
        (r["prompt"], r["completion"]) for r in RECORDS
    ]
    assert load_examples_for(str(jsonl), None, "chat", "validation") == examples
    chats = load_examples_for(str(csv), None, "chat", "train")  # the style still reaches CSV
    assert [e.messages[-1]["content"] for e in chats] == ["positive", "negative"]
    plains = load_examples_for(str(csv), None, "plain", "train")
    assert [e.completion for e in plains] == [" positive", " negative"]
    builtin = load_examples_for("chatterbot", None, "plain", "train")
    assert builtin and all(not e.is_chat and e.prompt.startswith("Question: ") for e in builtin)


def test_train_and_eval_commands_load_a_jsonl_file_under_a_style(tmp_path, monkeypatch, capsys):
    jsonl, csv = _files(tmp_path)

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("lorakit.models.resolve_model", reached)  # train: after both loads
    train = ["train", "--data", str(csv), "--style", "chat", "--eval-data", str(jsonl)]
    with pytest.raises(Reached):
        main([*train, "--output", str(tmp_path / "run")])
    monkeypatch.setattr("lorakit.commands.eval.load_model_and_adapter", reached)
    with pytest.raises(Reached):
        main(["eval", "--data", str(jsonl), "--style", "plain"])
    assert "do not apply" not in capsys.readouterr().err


def test_load_examples_refuses_a_style_for_a_jsonl_file_naming_file_and_option(tmp_path):
    jsonl, _ = _files(tmp_path)
    with pytest.raises(UserError) as error:
        data.load_examples(jsonl, style="plain")
    message = str(error.value)
    assert message.startswith(f"{jsonl}: ")
    assert "style='plain'" in message and "do not apply to JSONL files" in message
    with pytest.raises(UserError, match=rf"^{jsonl}: options style='chat', template do not"):
        data.load_examples(jsonl, style="chat", template="{text}")


# 2. the learnt part of a chat turn ends at its end-of-turn token


CHAT = (
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
)


def _learnt(tokenizer, messages) -> list[str]:
    ids, labels, _ = data.tokenize_example(Example(messages=messages), tokenizer, 1000)
    whole = tokenizer(
        render_chat(tokenizer, messages, add_generation_prompt=False), add_special_tokens=False
    )
    assert ids == whole["input_ids"]  # the tokens are the whole rendering's, whatever the mask
    return [tokenizer.decode([t]) for t, label in zip(ids, labels, strict=True) if label != -100]


@pytest.fixture(scope="module")
def smol():
    from lorakit.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


@pytest.mark.integration
def test_chatml_turns_end_at_im_end_where_eos_is_another_token(smol):
    """Qwen2.5 base: EOS ``<|endoftext|>``, ChatML turns end with ``<|im_end|>``."""
    assert _learnt(smol, CHAT) == ["Hello", "!", "<|im_end|>", "C", "iao", "<|im_end|>"]
    smol.eos_token = "<|endoftext|>"
    try:
        # was: [..., '<|im_end|>', '\n', 'C', 'iao', '<|im_end|>', '\n']
        assert _learnt(smol, CHAT) == ["Hello", "!", "<|im_end|>", "C", "iao", "<|im_end|>"]
    finally:
        smol.eos_token = "<|im_end|>"


def test_the_end_of_turn_token_ends_the_learnt_part_after_the_content():
    tokenizer = tiny_tokenizer.build()
    assert _learnt(tokenizer, CHAT) == _learnt_words(tokenizer, ["Hello!", "Ciao"])  # EOS
    tokenizer.eos_token = "<|endoftext|>"
    assert _learnt(tokenizer, CHAT) == _learnt_words(tokenizer, ["Hello!", "Ciao"])
    # EOS text inside the content: the turn still ends at the end-of-turn token after it
    inside = (CHAT[0], {"role": "assistant", "content": "a <|endoftext|> b"})
    assert "".join(_learnt(tokenizer, inside)) == "a <|endoftext|> b<|im_end|>"
    # a template that trims the content (as Gemma's does): found stripped
    tokenizer.chat_template = tiny_tokenizer.CHATML_TEMPLATE.replace(
        "message['content']", "(message['content'] | trim)"
    )
    padded = (CHAT[0], {"role": "assistant", "content": "  Hello!  "})
    assert "".join(_learnt(tokenizer, padded)) == "Hello!<|im_end|>"
    empty = (CHAT[0], {"role": "assistant", "content": ""}, *CHAT[2:])
    assert "".join(_learnt(tokenizer, empty)) == "<|im_end|>Ciao<|im_end|>"


def _learnt_words(tokenizer, contents: list[str]) -> list[str]:
    ids = [
        t
        for c in contents
        for t in tokenizer(c + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ]
    return [tokenizer.decode([t]) for t in ids]


# 3. a whitespace-only prompt is no question: the split uses the completion too


def test_whitespace_only_prompts_spread_over_the_splits(tmp_path):
    path = tmp_path / "blank.jsonl"
    records = [{"prompt": "\n", "completion": f" story number {i} about a cat"} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    sizes = {split: len(data.load_examples(path, split=split)) for split in data.SPLITS}
    assert sum(sizes.values()) == 200
    assert all(sizes.values()), sizes  # was: train 200, validation 0, test 0
    assert 140 <= sizes["train"] <= 180
    # an empty prompt keeps its split (by the completion alone), a real prompt splits by itself
    empty = Example(prompt="", completion=" story number 7 about a cat")
    assert data._split_key(empty) == " story number 7 about a cat"
    assert data._split_key(Example(prompt="Q?", completion=" a")) == "Q?"
    assert split_of(data._split_key(empty)) == split_of(" story number 7 about a cat")


# 4. shortening a review that also appears in its label word


WORDS = ("very good indeed yes", "absolutely terrible in every single possible way")


@pytest.mark.integration
def test_a_review_inside_its_label_word_is_shortened_without_crashing(smol):
    example = chat_classification_example(WORDS[0], 0, WORDS, "Classify: {text}", "f.csv:2")
    for max_length in range(40, 51):  # was: AttributeError at 44-46
        ids, labels, _ = data.tokenize_example(example, smol, max_length)
        assert len(ids) <= max_length
        learnt = smol.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
        assert learnt == "very good indeed yes<|im_end|>"  # the answer is kept whole
    fitted = data.fit_example(example, smol, 44)
    assert fitted.messages[0]["content"] == "Classify: very"  # the review cut, in the prompt
    assert fitted.messages[1] == example.messages[1]


def test_a_review_equal_to_its_label_word_is_found_in_the_prompt_only():
    tokenizer = tiny_tokenizer.build()
    words = ("the quick brown fox", "the lazy dog jumps over the quick brown fox again")
    example = chat_classification_example(words[0], 0, words, "Review: {text}", "f.csv:2")
    full = len(data.tokenize_example(example, tokenizer, 1000)[0])
    longest = chat_classification_example(words[0], 1, words, "Review: {text}", "f.csv:2")
    room = len(data.tokenize_example(longest, tokenizer, 1000)[0])
    for max_length in range(full - 4, room + 2):
        ids, _, _ = data.tokenize_example(example, tokenizer, max_length)
        assert len(ids) <= max_length
    fitted = data.fit_example(example, tokenizer, room - 1)
    assert fitted is not example and fitted.messages[1]["content"] == words[0]
    assert words[0].startswith(fitted.text) and fitted.text != words[0]


# 5. CSV rows with too few fields, and empty fields


def test_a_short_csv_row_is_named_by_its_field_count_and_an_empty_field_by_its_column(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text,label\nhello,pos\nbye\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: 1 field, the header has 2 \("):
        data.load_examples(path)
    path.write_text("label,text,extra\npos,hi,x\nneg\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: 1 field, the header has 3 \("):
        data.load_examples(path)
    path.write_text("text,label,note\nhi,pos\nbye,neg,x\n", encoding="utf-8")  # no note: fine
    assert [e.text for e in data.load_examples(path)] == ["hi", "bye"]
    path.write_text("text,label\nhello,pos\nbye,\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: empty 'label'; "):
        data.load_examples(path)
    path.write_text("text,label\nhello,pos\n  ,neg\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: empty 'text'; "):
        data.load_examples(path)
    path.write_text("text,label\nhello,pos\n,\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: empty 'text' and 'label'; "):
        data.load_examples(path)
