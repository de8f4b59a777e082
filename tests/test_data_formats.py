"""lorakit.data file formats: JSONL (prompt/completion, chat), CSV with a template; line-numbered
errors; the fixed split applied to files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import data
from lorakit.errors import UserError


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_pairs_and_chats(tmp_path: Path) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "2+2=", "completion": " 4", "id": 7})
        + "\n\n"
        + json.dumps({"messages": chat})
        + "\n",
        encoding="utf-8",
    )
    first, second = data.load_examples(path)
    assert (first.prompt, first.completion, first.is_chat) == ("2+2=", " 4", False)
    assert first.source == f"{path}:1"
    assert second.is_chat and list(second.messages) == chat
    assert second.answer == "Hello."
    assert second.source == f"{path}:3"  # the blank line 2 is skipped but still counted


BAD_RECORDS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "x"}', "expected keys 'prompt' and 'completion', or 'messages'"),
    ('{"prompt": "x"}', "'completion' must be a string"),
    ('{"prompt": 3, "completion": "y"}', "'prompt' must be a string"),
    ('{"prompt": "x", "completion": "y", "messages": []}', "not both"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot' is not one of"),
    ('{"messages": [{"role": "user", "content": 1}]}', r"messages\[0\] content must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "start with user"),
    ('{"messages": ["hi"]}', "must be an object"),
]


@pytest.mark.parametrize(("bad_line", "message"), BAD_RECORDS)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError, match=message) as error:
        data.read_jsonl(path)
    assert str(error.value).startswith(f"{path}:3: ")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        data.load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no examples"):
        data.load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match=r"\.jsonl or \.csv file or a built-in dataset"):
        data.load_examples(tmp_path / "data.txt")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        data.load_examples("rotten-tomatoes", split="dev")


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_plain_template_and_label_words(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "reviews.csv",
        'review,stars,other\n"Great, fun.",good,x\nDull.,bad,y\nFine film,good,z\n',
    )
    examples = data.load_examples(
        path,
        text_column="review",
        label_column="stars",
        template="Review: {text}\nSentiment:",
        label_words={"good": "positive", "bad": "negative"},
    )
    assert [e.prompt for e in examples] == [
        "Review: Great, fun.\nSentiment:",
        "Review: Dull.\nSentiment:",
        "Review: Fine film\nSentiment:",
    ]
    assert [e.completion for e in examples] == [" positive", " negative", " positive"]
    assert all(e.choices == (" positive", " negative") for e in examples)
    assert [e.label for e in examples] == [0, 1, 0]
    assert examples[1].source == f"{path}:3"


def test_csv_chat_style_and_default_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", "text,label\nhello,spam\nhi mum,ham\n")
    examples = data.load_examples(path, style="chat", instruction="Spam or ham?\n{text}")
    assert examples[0].messages == (
        {"role": "user", "content": "Spam or ham?\nhello"},
        {"role": "assistant", "content": "spam"},
    )
    assert [e.choices for e in examples] == [("ham", "spam")] * 2  # sorted distinct values
    assert [e.label for e in examples] == [1, 0]


def test_csv_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", "body,label\nx,a\n")
    with pytest.raises(UserError, match=r"no column 'text'; the columns are \['body', 'label'\]"):
        data.read_csv(path)
    path = write_csv(tmp_path / "u.csv", "text,label\nx,a\n,b\n")
    with pytest.raises(UserError, match=f"^{path}:3: empty 'text'"):
        data.read_csv(path)
    path = write_csv(tmp_path / "v.csv", "text,label\nx,a\ny,c\n")
    with pytest.raises(UserError, match=f"^{path}:3: label 'c' is not one of"):
        data.read_csv(path, label_words=["a", "b"])
    with pytest.raises(UserError, match="must contain"):
        data.read_csv(path, template="no field")
    with pytest.raises(UserError, match="field other than"):
        data.read_csv(path, template="{text} {label}")
    with pytest.raises(UserError, match="do not apply to JSONL"):
        data.load_examples(tmp_path / "x.jsonl", template="{text}")


def test_file_split_is_a_partition_by_prompt(tmp_path: Path) -> None:
    records = [{"prompt": f"question {i % 150}", "completion": f" answer {i}"} for i in range(300)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    every = data.load_examples(path)
    parts = {split: data.load_examples(path, split=split) for split in data.SPLITS}
    assert sum(len(part) for part in parts.values()) == len(every) == 300
    prompts = {split: {e.prompt for e in part} for split, part in parts.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert 0.65 < len(parts["train"]) / 300 < 0.95  # 80% expected, 150 distinct prompts


def test_invalid_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "café", "completion": " ok"}).encode()  # ASCII-escaped
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(good + b"\n" + good + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(UserError) as error:
        data.load_examples(jsonl)
    assert str(error.value).startswith(f"{jsonl}:3: not valid UTF-8 (byte 0xe9)")
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("text,label\nfine,pos\nna\xefve,neg\n".encode("latin-1"))
    with pytest.raises(UserError) as error:
        data.load_examples(csv_path)
    assert str(error.value).startswith(f"{csv_path}:3: not valid UTF-8 (byte 0xef)")
    # the same text saved as UTF-8 reads, with the accented characters intact
    csv_path.write_text("text,label\nfine,pos\nna\xefve,neg\n", encoding="utf-8")
    assert [e.text for e in data.load_examples(csv_path)] == ["fine", "na\xefve"]


def test_csv_row_with_more_fields_than_the_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text('text,label\n"fine, really",pos\nbad, film,neg\nok,pos\n', encoding="utf-8")
    with pytest.raises(UserError) as error:
        data.load_examples(path)
    assert (
        str(error.value)
        == f"{path}:3: 3 fields, the header has 2 (quote fields that contain commas)"
    )
    # a quoted comma stays inside its field
    path.write_text('text,label\n"fine, really",pos\nok,neg\n', encoding="utf-8")
    assert [e.text for e in data.load_examples(path)] == ["fine, really", "ok"]


def test_a_byte_order_mark_is_not_part_of_the_first_column_or_record(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" and some editors start the file with a UTF-8 byte-order mark."""
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext,label\ngood film,positive\ndull film,negative\n")
    example, _ = data.load_examples(csv_path)
    assert example.completion.strip() == "positive"
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "completion": "b"}).encode()
    )
    assert data.load_examples(jsonl_path)[0].prompt == "a"


def test_a_huge_integer_is_a_line_numbered_error(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": ' + "9" * 5000 + "}\n")
    with pytest.raises(UserError, match=rf"{path}:2: not valid JSON \(Exceeds the limit"):
        data.load_examples(path)


def test_a_chat_template_that_refuses_an_example_names_its_file_and_line(tmp_path: Path) -> None:
    from tests import tiny_tokenizer

    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, good[1]]
    path = write_jsonl(tmp_path / "alt.jsonl", [{"messages": good}, {"messages": bad}])
    examples = data.load_examples(path)
    with pytest.raises(
        UserError, match=rf"{path}:2: the model's chat template refused .*alternate"
    ):
        data.tokenize_examples(examples, tokenizer, 64)


def test_csv_split_is_by_the_text_whatever_the_style_and_template(tmp_path: Path) -> None:
    """The split of a CSV row depends on its text alone: train and test hold the same rows for
    every style and template, and no test text is in any training split."""
    import random

    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "dull", "fun", "boring", "smart", "cold"]
    rows = [" ".join(rng.choice(words) for _ in range(6)) + f" {i}" for i in range(400)]
    path = tmp_path / "reviews.csv"
    path.write_text(
        "text,label\n" + "".join(f"{t},{('pos', 'neg')[i % 2]}\n" for i, t in enumerate(rows)),
        encoding="utf-8",
    )
    settings = [
        {"style": "plain"},
        {"style": "chat"},
        {"style": "plain", "template": "Review: {text}\nSentiment:"},
        {"style": "chat", "instruction": "Spam? {text}"},
    ]
    expected = {split: [t for t in rows if data.split_of(t) == split] for split in data.SPLITS}
    assert all(expected.values())
    for options in settings:
        for split in data.SPLITS:
            texts = [e.text for e in data.load_examples(path, split, **options)]
            assert texts == expected[split], (options, split)


def test_csv_with_one_label_is_refused_unless_label_words_name_the_classes(
    tmp_path: Path,
) -> None:
    """One distinct label would make the choices a single word (accuracy 1.0 for any model)."""
    path = write_csv(tmp_path / "one.csv", "text,label\nwarm film,positive\ndull mess,positive\n")
    with pytest.raises(UserError) as error:
        data.load_examples(path)
    message = str(error.value)
    assert message.startswith(f"{path}: every row has the label 'positive'")
    assert "label_words=" in message
    examples = data.load_examples(path, label_words=["negative", "positive"])
    assert [e.choices for e in examples] == [(" negative", " positive")] * 2
    assert [e.label for e in examples] == [1, 1]
    with pytest.raises(UserError, match="at least two"):
        data.load_examples(path, label_words={"positive": "yes"})


def test_an_unterminated_quote_is_named_at_the_line_it_opens(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "quote.csv", 'text,label\n"a warm film,pos\na dull mess,neg\nok,pos\n'
    )
    with pytest.raises(UserError) as error:
        data.load_examples(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: ")
    assert "quote" in message and "never closed" in message and "empty" not in message
    path.write_text('text,label\nok,pos\nfine,"neg\n', encoding="utf-8")  # as the last field
    with pytest.raises(UserError, match=f"^{path}:3: .*never closed"):
        data.load_examples(path)
    # a closed quote spanning lines is a field with a newline, named by its first line
    path.write_text('text,label\nok,pos\n"two\nlines",neg\n,pos\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}:5: empty 'text'"):
        data.load_examples(path)
    path.write_text('text,label\nok,pos\n"two\nlines",neg\n', encoding="utf-8")
    assert [(e.text, e.source) for e in data.load_examples(path)][1] == ("two\nlines", f"{path}:3")
