"""Data for fine-tuning: examples, files, built-in datasets, tokenisation with loss masks, batches.

Typical use (the training loop's view)::

    from lorakit import data
    train = data.load_examples("rotten-tomatoes", split="train")     # list[Example]
    tokenized = data.tokenize_examples(train, tokenizer, max_length=128)
    for batch in data.batches(tokenized, batch_size=8, seed=0, shuffle=True):
        loss = model(**batch).loss          # input_ids, attention_mask, labels (-100 = no loss)

    test = data.load_examples("rotten-tomatoes", split="test")
    result = data.classify(model, tokenizer, test[:200])               # result.accuracy

See docs/models-and-data.md for the formats, the masks and the split.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.data.batching import batches, collate, length_grouped_batches, pad_left, pad_right
from lorakit.data.builtin import (
    BUILTIN_DATASETS,
    SENTIMENT_INSTRUCTION,
    SENTIMENT_LABELS,
    SENTIMENT_TEMPLATE,
    load_builtin,
)
from lorakit.data.examples import SPLITS, Example, check_split, select_split, split_of
from lorakit.data.formats import read_csv, read_jsonl
from lorakit.data.scoring import (
    ClassificationResult,
    choice_answer_ids,
    choice_token_ids,
    classify,
    score_choices,
    whole_answers_needed,
)
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    TokenizedData,
    fit_example,
    prompt_token_ids,
    tokenize_example,
    tokenize_examples,
)
from lorakit.errors import UserError

__all__ = [
    "BUILTIN_DATASETS",
    "IGNORE_INDEX",
    "SENTIMENT_INSTRUCTION",
    "SENTIMENT_LABELS",
    "SENTIMENT_TEMPLATE",
    "SPLITS",
    "ClassificationResult",
    "Example",
    "TokenizedData",
    "batches",
    "choice_answer_ids",
    "choice_token_ids",
    "classify",
    "collate",
    "fit_example",
    "length_grouped_batches",
    "load_examples",
    "pad_left",
    "pad_right",
    "prompt_token_ids",
    "read_csv",
    "read_jsonl",
    "score_choices",
    "split_of",
    "tokenize_example",
    "tokenize_examples",
    "whole_answers_needed",
]


def load_examples(
    spec: str | os.PathLike[str],
    split: str | None = None,
    *,
    style: str | None = None,
    **csv_options: object,
) -> list[Example]:
    """Examples from a built-in name (``rotten-tomatoes``, ``chatterbot``), a ``.jsonl`` file or
    a ``.csv`` file.

    ``split``: ``None``/``"all"``, or ``"train"``/``"validation"``/``"test"`` — the fixed 80/10/10
    split by a hash of the text (CSV files too, whatever ``style`` and template; JSONL files:
    of the prompt, or of the messages before the last assistant turn; with no question, a
    blank prompt or no user message with text, of those and the answer). ``style``: ``"chat"``
    (messages, rendered by the chat template) or ``"plain"`` (prompt/completion) for built-ins
    (default chat) and CSV (default plain); JSONL files say their own form (a style or CSV
    option given for one is refused, naming the file and the option). ``csv_options`` go to
    ``read_csv`` (``text_column``, ``label_column``, ``template``, ``instruction``, ``label_words``).
    """
    check_split(split)
    spec_text = os.fspath(spec)
    if spec_text in BUILTIN_DATASETS:
        if csv_options:
            raise UserError(f"options {sorted(csv_options)} apply to CSV files, not '{spec_text}'")
        return load_builtin(spec_text, split, style=style or "chat")
    path = Path(spec_text).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise UserError(
            f"unknown data '{spec_text}': give a .jsonl or .csv file or a built-in dataset "
            f"({', '.join(BUILTIN_DATASETS)})"
        )
    if suffix == ".jsonl":
        _refuse_jsonl_options(spec_text, style, csv_options)
        examples = read_jsonl(path)
    else:
        examples = read_csv(path, style=style or "plain", **csv_options)  # type: ignore[arg-type]
    return select_split(examples, (_split_key(e) for e in examples), split)


def _refuse_jsonl_options(spec: str, style: str | None, csv_options: dict[str, object]) -> None:
    """``UserError`` naming the file and the options when ``style`` or CSV options are given
    for a JSONL file (its records say their own form; ``lorakit train``/``eval`` pass
    ``--style`` to built-ins and CSV files only)."""
    named = ([f"style={style!r}"] if style else []) + sorted(csv_options)
    if named:
        raise UserError(
            f"{spec}: options {', '.join(named)} do not apply to JSONL files (each record says "
            "its own form: prompt/completion or messages); leave them out for this file"
        )


def _split_key(example: Example) -> str:
    """The text that decides an example's split: its raw ``text`` when it has one (CSV rows:
    the same split whatever the style and template, as the built-ins split by their text);
    else its prompt (or chat context), so that the same question with different answers never
    straddles train and test; a prompt of only whitespace, or empty (or a context of no
    question: no user message with text, e.g. a shared system prompt alone): with its answer
    (every such row would otherwise land in one split)."""
    if example.text:
        return example.text
    if not example.is_chat:  # a blank prompt ("\n") is no question: normalised, it is ""
        return example.prompt if example.prompt.strip() else example.prompt + example.completion
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    before = example.messages[:last]
    context = "\n".join(m["role"] + ": " + m["content"] for m in before)
    if not any(m["content"].strip() for m in before if m["role"] == "user"):  # no question
        return context + "\n" + example.messages[last]["content"]
    return context
