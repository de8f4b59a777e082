"""The tokens each piece of a chat adds after the pieces before it, in two or three tokenisations
of the whole text instead of one per piece (``segments._joined_segments``).

For pieces ``p_1 .. p_m`` of a text ``T`` (cut at ``c_i = len(p_1 + ... + p_i)``) the tokens
of piece ``i`` are those it adds to the text before it::

    W_i = ids(T[:c_i])                     (W_0 = [], no special tokens added)
    tokens_i = W_i[len(W_{i-1}):]          where W_{i-1} is a prefix of W_i (else: None here)

Tokenising every prefix whole costs ``sum_i c_i``, quadratic in the number of turns. A fast
tokenizer (and a slow one alike) first splits its input at the added tokens it holds, then
normalises, pre-tokenises and runs its model on each part, so the text can be tokenised in
groups, each a special token and the text up to the next one (the first: the text before the
first special token)::

    ids(T[:c]) = ids(T[:s]) + ids(T[s:c])    s: the start of a special token whole in T[:c]

A group starts with its special token, so its text is tokenised as it is after one: without
the "▁" a Metaspace pre-tokenizer with ``prepend_scheme="first"`` (Llama-2 and Mistral as
transformers now loads them) puts before the first part of a text only. With ``B`` the
concatenated ids of the groups (each tokenised once) and ``s_i`` the last group start usable
for ``c_i``::

    W_i = B[:offset(s_i)] + ids(T[s_i:c_i])

which needs only the short tails ``T[s_i:c_i]`` (``<|im_start|>assistant\n``, ``<|im_end|>``),
all in one call. Used only where that grouping is checked to hold, ``B == ids(T)`` (one more
tokenisation), and with the added special tokens that the tokenizer matches in the raw text
with nothing before them: not normalised first, no ``lstrip``, not ``single_word``;
elsewhere (``None``) the caller tokenises every prefix whole, as before.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence

__all__ = ["piece_continuations"]


def piece_continuations(tokenizer, pieces: Sequence[str]) -> list[list[int] | None] | None:
    """Per piece, ``W_i[len(W_{i-1}):]`` where ``W_{i-1}`` is a prefix of ``W_i``, else None
    (module docstring): the ids tokenising each prefix whole gives. None where the text holds
    no special token to group at, or the tokenizer does not split there as assumed."""
    text = "".join(pieces)
    end_of = _special_spans(tokenizer, text)  # start -> end of each special token in text
    if not end_of:
        return None
    edges = sorted({0, len(text), *end_of})  # where the groups start
    parts = _encode(tokenizer, [text[a:b] for a, b in itertools.pairwise(edges)])
    joined = [token for ids in parts for token in ids]
    if joined != _encode(tokenizer, [text])[0]:
        return None
    offset = dict(zip(edges, itertools.accumulate(map(len, parts), initial=0), strict=True))
    cuts = list(itertools.accumulate(map(len, pieces)))
    splits = [_last_split(cut, edges, end_of) for cut in cuts]
    tails = _encode(tokenizer, [text[split:cut] for split, cut in zip(splits, cuts, strict=True)])
    result: list[list[int] | None] = []
    previous_split, previous_tail = 0, []
    for split, tail in zip(splits, tails, strict=True):
        grown = joined[offset[previous_split] : offset[split]] + tail  # W_i past W_{i-1}'s part
        prefix = grown[: len(previous_tail)] == previous_tail
        result.append(grown[len(previous_tail) :] if prefix else None)
        previous_split, previous_tail = split, tail
    return result


def _last_split(cut: int, edges: list[int], end_of: dict[int, int]) -> int:
    """The last group start at or before ``cut`` where ``T[:cut]`` splits: 0, or the start of a
    special token whole in ``T[:cut]`` (one that ``cut`` falls inside is cut short there, so
    not split off)."""
    index = bisect.bisect_right(edges, cut) - 1
    while index and end_of.get(edges[index], 0) > cut:
        index -= 1
    return edges[index]


def _special_spans(tokenizer, text: str) -> dict[int, int]:
    """``{start: end}`` of the special tokens in ``text``, found as the tokenizer finds added
    tokens (leftmost, then longest), of those that split its input as they are."""
    texts = _splitting_specials(tokenizer)
    if not texts:
        return {}
    pattern = re.compile("|".join(map(re.escape, texts)))
    return {match.start(): match.end() for match in pattern.finditer(text)}


def _splitting_specials(tokenizer) -> list[str]:
    """The added special tokens' texts, longest first, of those matched in the raw text with
    nothing before them: not normalised first, no ``lstrip``, not ``single_word`` (an
    ``rstrip`` token takes the whitespace after it, inside its own group)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {
        token.content
        for token in added.values()
        if getattr(token, "special", False)
        and token.content
        and not any(getattr(token, flag, False) for flag in ("normalized", "lstrip", "single_word"))
    }
    return sorted(texts, key=lambda content: (-len(content), content))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text tokenised alone, without special tokens, in one call."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
