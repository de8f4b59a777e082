"""Shortening a classification example to a token budget inside its template (``fit_example``).

An example with ``text`` (a review inside an instruction template) too long for ``max_length``
keeps its template, instruction and answer, and loses whole words off the END of its text
(characters, in text without spaces). Measured with the longest of its choices as the answer,
so the cut does not depend on the label. ``template_length`` is the budget below which the
template itself does not fit (``lorakit.data.tokenize`` then cuts tokens from the left).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from lorakit.data.examples import Example
from lorakit.data.segments import example_segments

__all__ = [
    "LONG_WORD_CHARS",
    "fit_example",
    "longest_answer",
    "template_length",
    "token_count",
    "with_answer",
    "with_text",
]


def token_count(example: Example, tokenizer) -> int:
    return sum(len(ids) for ids, _ in example_segments(example, tokenizer))


def with_text(example: Example, short: str) -> Example | None:
    """``example`` with its ``text`` replaced by ``short`` where the text appears (once) in the
    prompt or in one non-assistant message; None when it cannot be located unambiguously.

    Answers are not searched (a completion, an assistant message): a review that is also the
    label word (``"good"``), or part of it, is still found in the prompt, and the example and
    its longest-answer probe (``fit_example``) locate it alike."""
    text = example.text
    if not example.is_chat:
        if example.prompt.count(text) != 1:
            return None
        return dataclasses.replace(example, prompt=example.prompt.replace(text, short), text=short)
    holders = [
        i
        for i, m in enumerate(example.messages)
        if m["role"] != "assistant" and text in m["content"]
    ]
    if len(holders) != 1:
        return None
    message = example.messages[holders[0]]
    if message["content"].count(text) != 1:
        return None
    messages = list(example.messages)
    messages[holders[0]] = {**message, "content": message["content"].replace(text, short)}
    return dataclasses.replace(example, messages=tuple(messages), text=short)


def fit_example(example: Example, tokenizer, max_length: int) -> Example:
    """``example`` itself if it tokenises to at most ``max_length`` tokens; else, for an example
    with ``text`` (classification data), the example with the longest word prefix of its text
    that fits (binary search over word counts; within a run of more than ``LONG_WORD_CHARS``
    characters without whitespace, as in Chinese or Japanese text, the longest character
    prefix), template and answer unchanged. Examples without
    ``text``, or whose template alone does not fit, are returned as they are (``tokenize_example``
    then cuts tokens from the left).

    An example with ``choices`` is measured with its longest choice as the answer, so the cut
    does not depend on the label: training and scoring see the same prompt for every label, and
    the prompt length never hints at the answer."""
    probe = longest_answer(example, tokenizer)
    if not example.text or token_count(probe, tokenizer) <= max_length:
        return example
    word_ends = [match.end() for match in re.finditer(r"\S+", example.text)]

    def first_words(words: int) -> str:  # built only for the counts probed (O(log n) of them)
        return example.text[: word_ends[words - 1]] if words else ""

    def fits(words: int) -> bool:
        shortened = with_text(probe, first_words(words))
        return shortened is not None and token_count(shortened, tokenizer) <= max_length

    if not fits(0):
        return example
    words = _longest(0, len(word_ends) - 1, fits)  # fits(0) holds; all the words do not
    kept = first_words(words)
    start = len(kept)
    end = word_ends[words] if word_ends else start  # the next word, which does not fit whole
    if end - start > LONG_WORD_CHARS:  # text without spaces (Chinese, Japanese, Thai...)

        def fits_chars(count: int) -> bool:
            shortened = with_text(probe, example.text[: start + count])
            return shortened is not None and token_count(shortened, tokenizer) <= max_length

        cut = _character_start(example.text, start + _longest(0, end - start - 1, fits_chars))
        kept = example.text[: max(cut, start)]
    shortened = with_text(example, kept)
    return example if shortened is None else shortened  # (None: tokenize_example cuts tokens)


def _character_start(text: str, cut: int) -> int:
    """``cut`` moved back to the start of the character it falls in, as a reader sees it: not
    before a mark (an accent, a Thai or Devanagari vowel sign, a keycap), a joiner (U+200D) or
    what it joins, a variation selector, an emoji modifier or a flag's tag, nor between the two
    halves of a flag (a pair of regional indicators)."""

    def attached(char: str) -> bool:  # belongs to the character before it
        code = ord(char)
        return (
            unicodedata.category(char).startswith("M")  # marks: accents, Thai and Indic vowels
            or code == 0x200D
            or 0xFE00 <= code <= 0xFE0F
            or 0x1F3FB <= code <= 0x1F3FF
            or 0xE0020 <= code <= 0xE007F  # tags of subdivision flags
        )

    while 0 < cut < len(text) and (attached(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    flags = 0
    while flags < cut and 0x1F1E6 <= ord(text[cut - 1 - flags]) <= 0x1F1FF:
        flags += 1
    return cut - 1 if flags % 2 else cut


LONG_WORD_CHARS = 16
"""A "word" (a run without whitespace) longer than this is cut by characters when it does not
fit whole: in text without spaces it is a whole sentence or review, not a word."""


def _longest(low: int, high: int, fits) -> int:
    """The largest ``n`` in ``[low, high]`` with ``fits(n)``, by binary search (``fits`` is
    monotone and ``fits(low)`` holds)."""
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def longest_answer(example: Example, tokenizer) -> Example:
    """``example`` with the choice that tokenises longest as its answer (itself if no choices)."""
    if not example.choices:
        return example
    variants = [with_answer(example, choice) for choice in example.choices]
    return max(variants, key=lambda variant: token_count(variant, tokenizer))


def with_answer(example: Example, answer: str) -> Example:
    """``example`` with ``answer`` as its completion (plain) or last assistant content (chat)."""
    if not example.is_chat:
        return dataclasses.replace(example, completion=answer)
    messages = list(example.messages)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        return example
    last = turns[-1]
    messages[last] = {**messages[last], "content": answer}
    return dataclasses.replace(example, messages=tuple(messages))


def template_length(example: Example, tokenizer) -> int | None:
    """Tokens of ``example`` with an empty ``text`` and its longest answer: the least
    ``max_length`` at which ``fit_example`` can shorten it inside its template (below it, the
    prompt loses its start: a chat template's system prompt and instruction). None for an example
    without ``text``, or whose text cannot be located in the prompt."""
    if not example.text:
        return None
    empty = with_text(longest_answer(example, tokenizer), "")
    return None if empty is None else token_count(empty, tokenizer)
