"""Reading examples from files: JSONL (prompt/completion or chat messages) and labelled CSV.

Every malformed record raises ``UserError`` naming the file and the line number.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import reprlib
from pathlib import Path

from lorakit.data.csv_rows import csv_rows
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
        _check_not_tool_calling(message, index, where)
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


def _check_not_tool_calling(message: dict, index: int, where: str) -> None:
    """``UserError`` for a message of a tool-calling chat (OpenAI's form): a ``tool`` (or
    ``function``) role, or ``tool_calls`` / ``function_call`` (an assistant call, its content
    often null), which lorakit would otherwise refuse without saying why, or silently drop."""
    role = message.get("role")
    calls = [key for key in ("tool_calls", "function_call") if message.get(key)]
    if role not in ("tool", "function") and not calls:
        return
    what = f"has role {role!r}" if role in ("tool", "function") else f"holds {calls[0]!r}"
    raise UserError(
        f"{where}: messages[{index}] {what}: tool-calling chats are not supported; flatten "
        "them into text content (write each tool call in its assistant message's 'content' "
        "and each tool result as a 'user' message, as the model should see them) or leave "
        "those messages out"
    )


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
    rows = csv_rows(text_of_file, path, text_column, label_column)
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
