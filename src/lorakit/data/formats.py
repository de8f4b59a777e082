"""Reading examples from files: JSONL (prompt/completion or chat messages) and labelled CSV.

Every malformed record raises ``UserError`` naming the file and the line number.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import reprlib
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from lorakit.data.examples import (
    ROLES,
    Example,
    chat_classification_example,
    plain_classification_example,
)
from lorakit.data.label_words import LabelWords, answer_words
from lorakit.errors import UserError

__all__ = ["DEFAULT_INSTRUCTION", "DEFAULT_TEMPLATE", "read_csv", "read_jsonl", "read_utf8"]

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"
DEFAULT_INSTRUCTION = "Classify this text. Answer with one word.\n\nText: {text}"


def read_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Examples from a JSONL file, one JSON object per line (blank lines skipped).

    Each object is ``{"prompt": str, "completion": str}`` or
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at least
    one assistant message. Other keys are ignored. An empty completion (or assistant content) is
    kept: training learns its EOS (end-of-turn token) alone, as TRL does.
    """
    path = Path(path)
    examples = []
    with io.StringIO(read_utf8(path), newline="") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{where}: not valid JSON ({error.msg}){_HINT_ONE_PER_LINE}"
                ) from None
            except ValueError as error:  # e.g. an integer of more than 4,300 digits
                raise UserError(f"{where}: not valid JSON ({error})") from None
            except RecursionError:  # the json module recurses once per level of [ or {
                raise UserError(f"{where}: not valid JSON (nested too deeply)") from None
            examples.append(_example_from_record(record, where))
    if not examples:
        raise UserError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return examples


_HINT_ONE_PER_LINE = (
    "; a .jsonl file holds one JSON object per line (a pretty-printed object spread over "
    "several lines, or a JSON array, does not work: write each example on one line)"
)


def read_utf8(path: str | os.PathLike[str], what: str = "data") -> str:
    """The text of a UTF-8 file; ``UserError`` naming ``file:line`` of the first byte that is
    not UTF-8 (and for a missing file or a directory). ``what`` names the file in messages."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} file '{path}' does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} path '{path}' is a directory, not a file") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark (Excel's "CSV UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        before = raw[: error.start]  # lines end at \n, \r or \r\n, as the readers split them
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[error.start]:#04x}); save the file as UTF-8"
        ) from None


def _example_from_record(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        hint = _HINT_ONE_PER_LINE if isinstance(record, list) else ""
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}{hint}")
    has_pair = "prompt" in record or "completion" in record
    if has_pair and "messages" in record:
        raise UserError(f"{where}: give either prompt/completion or messages, not both")
    if "messages" in record:
        return Example(messages=_checked_messages(record["messages"], where), source=where)
    if not has_pair:
        raise UserError(
            f"{where}: expected keys 'prompt' and 'completion', or 'messages'; got {sorted(record)}"
        )
    for key in ("prompt", "completion"):
        _check_pair_field(record, key, where)
    return Example(prompt=record["prompt"], completion=record["completion"], source=where)


def _check_pair_field(record: dict, key: str, where: str) -> None:
    """``UserError`` unless ``record[key]`` is a string: naming a missing key as missing, and
    pointing TRL's conversational form (a list of role/content messages) to ``messages``; the
    value shortened by ``reprlib`` (a long one would flood the message)."""
    if key not in record:
        raise UserError(
            f"{where}: missing key '{key}'; give both 'prompt' and 'completion' ('{key}' must be "
            "a string)"
        )
    value = record[key]
    messages = isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)
    if value and messages:
        raise UserError(
            f"{where}: '{key}' is a list of messages ({reprlib.repr(value)}), TRL's conversational "
            'prompt/completion form; lorakit reads a chat as {"messages": [...]}: write the '
            "prompt's messages, then the completion's, in one 'messages' list"
        )
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {reprlib.repr(value)}")
    _check_no_lone_surrogate(value, f"'{key}'", where)


def _checked_messages(messages: object, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:  # (names a lone surrogate escape too: repr writes 'user\\ud83d')
            raise UserError(f"{where}: messages[{index}] role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise UserError(f"{where}: messages[{index}] content must be a string")
        _check_no_lone_surrogate(content, f"messages[{index}] content", where)
        checked.append({"role": role, "content": content})
    if checked[0]["role"] == "assistant":
        raise UserError(f"{where}: the first message is from the assistant; start with user")
    if not any(message["role"] == "assistant" for message in checked):
        raise UserError(f"{where}: no assistant message (nothing to learn)")
    return tuple(checked)


def _check_no_lone_surrogate(text: str, name: str, where: str) -> None:
    """``UserError`` if ``text`` holds half a UTF-16 surrogate pair (JSON's ``"\\ud83d"`` alone, as
    ``JSON.stringify`` writes a text cut mid-emoji): no UTF-8 tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(
            f"{where}: {name} holds \\u{ord(text[error.start]):04x}, half of a surrogate pair (an "
            "emoji cut in two?), which is not text; remove the escape or write the whole character"
        ) from None


def read_csv(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    style: str = "plain",
    template: str = DEFAULT_TEMPLATE,
    instruction: str = DEFAULT_INSTRUCTION,
    label_words: LabelWords | None = None,
) -> list[Example]:
    """Classification examples from a CSV file with a header row.

    ``style="plain"``: prompt ``template.format(text=...)``, completion ``" " + word``.
    ``style="chat"``: user ``instruction.format(text=...)``, assistant ``word``.
    ``label_words`` maps raw label values to answer words (a dict), or lists the allowed values
    in choice order; default: the distinct values of the label column, sorted. Integer keys or
    entries (a model's ``id2label``, ``{0: "negative", 1: "positive"}``) stand for their
    ``str()``, as CSV labels are text; answer words must be non-empty strings. There must be at
    least two answer words: a file whose rows all carry one label needs ``label_words`` naming
    every class (else ``UserError``; one choice would score 100% for any model). Errors name
    ``file:line`` of the record's first line (an unterminated quote is named where it opens).
    """
    path = Path(path)
    _check_format(template if style == "plain" else instruction, style)
    text_of_file = read_utf8(path)
    with _field_size_limit(len(text_of_file)), io.StringIO(text_of_file, newline="") as handle:
        rows = _csv_rows(csv.DictReader(handle), text_of_file, path, text_column, label_column)
    if not rows:
        raise UserError(f"{path}: no rows")
    values = sorted({raw for _, raw, _ in rows})
    word_of, words = answer_words(label_words, values, path, label_column)
    examples = []
    for text, raw_label, where in rows:
        if raw_label not in word_of:
            raise UserError(
                f"{where}: label {raw_label!r} is not one of {sorted(word_of)}; add it to "
                "label_words with its answer word (lorakit.data.load_examples(..., "
                "label_words=...)), or remove the row"
            )
        label = words.index(word_of[raw_label])
        if style == "plain":
            examples.append(plain_classification_example(text, label, words, template, where))
        else:
            examples.append(chat_classification_example(text, label, words, instruction, where))
    return examples


def _csv_rows(
    reader: csv.DictReader, text_of_file: str, path: Path, text_column: str, label_column: str
) -> list[tuple[str, str, str]]:
    """``(text, raw label, "file:line")`` of each record ``reader`` reads from ``text_of_file``;
    ``UserError`` for a missing column, an empty file, an unterminated quote, more fields than
    the header's (or too few to reach the text or label column), an empty text or label (naming
    that column), and for what the csv module cannot read (``csv.Error``)."""
    lines = io.StringIO(text_of_file, newline="").readlines()  # as csv counts them
    try:
        return _checked_csv_rows(reader, lines, path, text_column, label_column)
    except csv.Error as error:
        raise UserError(
            f"{path}:{_record_start(lines, reader.line_num)}: not readable as CSV ({error}); "
            "check the quoting around this line (a quoted field ends with a quote before the "
            "next comma or line end), or save the file again as comma-separated CSV"
        ) from None


def _checked_csv_rows(
    reader: csv.DictReader, lines: Sequence[str], path: Path, text_column: str, label_column: str
) -> list[tuple[str, str, str]]:
    """``_csv_rows`` less its handling of ``csv.Error``."""
    columns = reader.fieldnames or []
    if not columns:
        raise UserError(
            f"{path}: the file is empty; write a header row naming the columns "
            f"('{text_column},{label_column}'), then one row per example"
        )
    counts = Counter(columns)
    repeated = [name for name in (text_column, label_column) if counts[name] > 1]
    if repeated:  # DictReader would silently keep the last column of each repeated name
        raise UserError(
            f"{path}:1: the header {','.join(columns)!r} names the column(s) {repeated} more "
            "than once, so one of them would be read silently; rename or drop the duplicate column"
        )
    for column in (text_column, label_column):
        if column not in columns:
            raise UserError(
                f"{path}: no column '{column}'; the columns are {columns}. Rename the header "
                f"row's columns to '{text_column},{label_column}', or from Python name the "
                "file's own: lorakit.data.load_examples(..., text_column=..., label_column=...)"
            )
    rows = []
    end = reader.line_num
    for row in reader:
        start, end = _record_start(lines, end), reader.line_num
        where = f"{path}:{start}"
        if end == len(lines) and _unterminated_quote("".join(lines[start - 1 :])):
            raise UserError(
                f"{where}: a quote opened in this record is never closed, so the record "
                f"runs to the end of the file (line {end}); close the quote, and write a "
                'quote inside a quoted field as two ("")'
            )
        if None in row:  # DictReader's key for fields beyond the header's
            raise UserError(
                f"{where}: {len(columns) + len(row[None])} fields, the header has "
                f"{len(columns)} (quote fields that contain commas)"
            )
        text, raw_label = row.get(text_column), row.get(label_column)
        if text is None or raw_label is None:  # DictReader's value for fields the row lacks
            fields = sum(value is not None for value in row.values())
            raise UserError(
                f"{where}: {_fields(fields)}, the header has {len(columns)} (a missing comma, "
                f"or a line break inside an unquoted field: quote it); every row needs its "
                f"'{text_column}' and '{label_column}'"
            )
        named = ((text_column, text), (label_column, raw_label))
        empty = [name for name, value in named if not value.strip()]
        if empty:
            raise UserError(
                f"{where}: empty {' and '.join(repr(name) for name in empty)}; give every row "
                "a text and a label, or remove the row"
            )
        rows.append((text.strip(), raw_label.strip(), where))
    return rows


def _fields(count: int) -> str:
    """``"1 field"``, ``"3 fields"``."""
    return f"{count} field" if count == 1 else f"{count} fields"


@contextlib.contextmanager
def _field_size_limit(limit: int) -> Iterator[None]:
    """``csv.field_size_limit`` raised to at least ``limit`` characters (a file's length bounds
    its longest field; the default, 131,072, refuses longer ones) while inside; restored after."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, min(limit, sys.maxsize)))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _record_start(lines: Sequence[str], previous_end: int) -> int:
    """The line (1-based) a CSV record starts on, after the previous record's last line
    ``previous_end``: blank lines between records are skipped (csv skips them too)."""
    start = previous_end + 1
    while start <= len(lines) and lines[start - 1] in ("\n", "\r\n", "\r"):
        start += 1
    return start


def _unterminated_quote(record: str) -> bool:
    """Whether the CSV text ``record`` (one record, up to the end of the file) opens a quoted
    field that is never closed (the lenient reader then takes the rest of the file as that
    field)."""
    try:
        for _ in csv.reader(io.StringIO(record, newline=""), strict=True):
            pass
    except csv.Error as error:
        return "unexpected end of data" in str(error)
    return False


def _check_format(template: str, style: str) -> None:
    if style not in ("plain", "chat"):
        raise UserError(f"unknown style '{style}'; choose 'plain' or 'chat'")
    if "{text}" not in template:
        raise UserError(f"template {template!r} must contain '{{text}}'")
    try:
        template.format(text="")
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"template {template!r} has a field other than {{text}} ({error!r}); "
            "write literal braces as {{ and }}"
        ) from None
