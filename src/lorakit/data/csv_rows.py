"""The rows of a labelled CSV file, each checked: ``(text, raw label, "file:line")``.

Every malformed record raises ``UserError`` naming ``file:line`` of its first line (an
unterminated quote is named where it opens). ``lorakit.data.formats.read_csv`` turns the rows
into examples.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from lorakit.errors import UserError

__all__ = ["csv_rows"]


def csv_rows(
    text_of_file: str, path: Path, text_column: str, label_column: str
) -> list[tuple[str, str, str]]:
    """``(text, raw label, "file:line")`` of each record of the CSV text ``text_of_file`` (read
    from ``path``, which names it in errors), with a header row naming ``text_column`` and
    ``label_column``; checked as ``_csv_rows`` says."""
    with _field_size_limit(len(text_of_file)), io.StringIO(text_of_file, newline="") as handle:
        return _csv_rows(csv.DictReader(handle), text_of_file, path, text_column, label_column)


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
