"""Data fixes (review 32): a CSV header naming a column twice is refused (csv.DictReader kept the
last one silently); a JSONL string holding a lone surrogate escape (``"\\ud83d"``, half an emoji)
is refused at ``file:line`` instead of crashing the tokenizer after the model loads; JSON nested
too deeply is a ``UserError``, not a bare ``RecursionError``; a UTF-8 error in a file whose lines
end in a lone CR names the line the readers count."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.data import read_csv, read_jsonl
from lorakit.data.formats import read_utf8
from lorakit.errors import UserError


class Reached(Exception):
    """Raised by a stand-in for the model loading: the data was loaded without an error."""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


# 1. a header naming a column twice


@pytest.mark.parametrize(
    ("header", "repeated"),
    [("text,label,text", "['text']"), ("text,label,label", "['label']")],
)
def test_a_header_repeating_the_text_or_label_column_is_refused(tmp_path, header, repeated):
    path = _write(tmp_path, "dup.csv", f"{header}\ngreat,pos,neg\nawful,neg,pos\n")
    with pytest.raises(UserError) as caught:
        read_csv(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:1: the header '{header}' ")
    assert f"names the column(s) {repeated} more than once" in message
    assert "rename or drop the duplicate column" in message


def test_a_repeated_column_training_never_reads_is_accepted(tmp_path):
    """Only the text and label columns are read: a repeated ``note`` column (spreadsheet
    exports have them) is harmless, and refusing it broke files that trained before
    (regression review)."""
    text = "note,text,label,note,x,x\nn1,great,pos,n2,a,b\nn3,awful,neg,n4,c,d\n"
    examples = read_csv(_write(tmp_path, "dup.csv", text))
    assert [(e.text, e.completion) for e in examples] == [("great", " pos"), ("awful", " neg")]


def test_blank_header_cells_may_repeat_and_the_named_columns_are_read(tmp_path):
    """Spreadsheets write stray empty columns as ``text,label,,``: no name is taken twice."""
    path = _write(tmp_path, "blank.csv", "text,label,,\ngreat,pos,,\nawful,neg,,\n")
    examples = read_csv(path)
    assert [(e.text, e.completion) for e in examples] == [("great", " pos"), ("awful", " neg")]


# 2. a lone surrogate escape in a JSONL string


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ({"prompt": "Review: great \ud83d", "completion": " positive"}, "'prompt'"),
        ({"prompt": "Review: great", "completion": " pos\udc00"}, "'completion'"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "\ude00"},
                ]
            },
            "messages[1] content",
        ),
    ],
)
def test_a_lone_surrogate_escape_is_refused_naming_line_key_and_escape(tmp_path, record, named):
    good = json.dumps({"prompt": "a", "completion": " b"})
    path = _write(tmp_path, "cut.jsonl", f"{good}\n{json.dumps(record)}\n")
    escape = re.search(r"\\u(d[89a-f][0-9a-f]{2})", json.dumps(record)).group(0)
    assert escape in path.read_text(encoding="utf-8")  # the file holds the escape, as JSON text
    with pytest.raises(UserError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:2: {named} holds {escape}, half of a surrogate")


def test_a_lone_surrogate_in_a_role_is_refused_naming_the_escape(tmp_path):
    line = '{"messages": [{"role": "user\\ud83d", "content": "hi"}, {"role": "assistant", "content": "ok"}]}'
    path = _write(tmp_path, "role.jsonl", line + "\n")
    with pytest.raises(UserError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:1: messages[0] role 'user\\ud83d' is not one of")


def test_a_whole_surrogate_pair_is_one_character_and_accepted(tmp_path):
    path = _write(
        tmp_path, "emoji.jsonl", '{"prompt": "great \\ud83d\\ude00", "completion": " ok"}\n'
    )
    (example,) = read_jsonl(path)
    assert example.prompt == "great \U0001f600"


def test_train_refuses_a_lone_surrogate_before_loading_the_model(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, "cut.jsonl", '{"prompt": "great \\ud83d", "completion": " pos"}\n')

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("lorakit.models.resolve_model", reached)
    assert main(["train", "--data", str(path), "--output", str(tmp_path / "run")]) == 2
    assert f"{path}:1: 'prompt' holds \\ud83d" in capsys.readouterr().err


# 3. JSON nested too deeply


def test_json_nested_too_deeply_is_a_user_error_naming_the_line(tmp_path):
    depth = 100_000  # beyond any recursion limit of the json module
    deep = '{"prompt": "a", "completion": "b", "meta": ' + "[" * depth + "]" * depth + "}"
    path = _write(tmp_path, "deep.jsonl", '{"prompt": "a", "completion": "b"}\n' + deep + "\n")
    with pytest.raises(UserError) as caught:
        read_jsonl(path)
    assert str(caught.value) == f"{path}:2: not valid JSON (nested too deeply)"


def test_moderately_nested_json_in_an_ignored_key_is_read(tmp_path):
    deep = '{"prompt": "a", "completion": "b", "meta": ' + "[" * 200 + "]" * 200 + "}"
    path = _write(tmp_path, "deep.jsonl", deep + "\n")
    assert [(e.prompt, e.completion) for e in read_jsonl(path)] == [("a", "b")]


# 4. the line of a UTF-8 error counts \r, \n and \r\n as the readers do


def test_a_utf8_error_in_a_cr_only_jsonl_file_names_its_line(tmp_path):
    path = tmp_path / "cr.jsonl"
    path.write_bytes(
        b'{"prompt":"a","completion":"b"}\r{"prompt":"c","completion":"d"}\r{"prompt":"caf\xe9"}\r'
    )
    with pytest.raises(UserError, match=re.escape(f"{path}:3: not valid UTF-8 (byte 0xe9)")):
        read_jsonl(path)


def test_a_utf8_error_in_a_cr_only_csv_file_names_its_line(tmp_path):
    path = tmp_path / "cr.csv"
    path.write_bytes(b"text,label\rgood,pos\rbad,neg\rcaf\xe9,pos\r")
    with pytest.raises(UserError, match=re.escape(f"{path}:4: not valid UTF-8 (byte 0xe9)")):
        read_csv(path)


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (b"a\r\nb\rc\nd\xe9", 4),  # mixed endings: \r\n counts once
        (b"a\r\n\r\n\xe9", 3),
        (b"a\r\r\xe9", 3),
        (b"a\n\r\xe9", 3),  # \n then \r: two line ends
        (b"\xef\xbb\xbfa\r\xff", 2),  # after a byte-order mark
        (b"\xe9", 1),
    ],
)
def test_read_utf8_counts_lines_as_the_readers_split_them(tmp_path, raw, line):
    path = tmp_path / "file.txt"
    path.write_bytes(raw)
    with pytest.raises(UserError, match=re.escape(f"{path}:{line}: not valid UTF-8")):
        read_utf8(path)
    text = raw.decode("utf-8-sig", errors="replace")  # the oracle: the readers' own split
    assert len(io.StringIO(text[: text.index("\ufffd") + 1], newline="").readlines()) == line
