"""The text and the exact bytes of one token, as OpenAI's ``logprobs`` give them; the text of a
completion after its prompt.

Decoding a token alone (``tokenizer.decode([id])``) loses what only its neighbours settle: a
byte-level BPE token holding part of a character decodes to U+FFFD, and some decoders drop a
token's leading space. The bytes come from the vocabulary instead:

- byte-level BPE (GPT-2, Llama 3, SmolLM2): each character of the token stands for one byte,
  by GPT-2's byte-to-character table (``BYTE_OF_CHARACTER``);
- SentencePiece byte fallback: a token ``<0xE2>`` is that byte;
- otherwise the token's text, with SentencePiece's ``▁`` read as a space.

The text is those bytes decoded as UTF-8 (U+FFFD for a part of a character, whose bytes are
still exact).

A completion's text is decoded in context: ``text_after`` decodes the generated ids after the
prompt's last few tokens (``prompt_tail``) and takes away the tail's own text, so the first
generated token keeps the space a SentencePiece decoder strips from the start of a text
(Llama-2, Mistral: prompt "low rank" continues " lo", not "lo"). That is the text after the
prompt in ``decode(prompt + generated)``, as transformers' ``TextGenerationPipeline``
(``return_full_text=False``) and vLLM's detokenizer (primed with the last 5 prompt tokens)
give it, and the concatenation of the tokens' texts above. A byte-level BPE's text is its
tokens' bytes: its completion text is the generated ids' decoding alone, as before (unless
the prompt ends inside a character, ``text_after``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BYTE_OF_CHARACTER",
    "PROMPT_TAIL_TOKENS",
    "PromptTail",
    "prompt_tail",
    "text_after",
    "token_piece",
]


def _byte_of_character() -> dict[str, int]:
    """GPT-2's table, inverted: printable bytes stand for themselves, the other 68 bytes for the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in printable]
    table = {chr(byte): byte for byte in printable}
    table |= {chr(0x100 + index): byte for index, byte in enumerate(others)}
    return table


BYTE_OF_CHARACTER = _byte_of_character()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_piece(tokenizer, token_id: int) -> tuple[str, bytes]:
    """``(text, bytes)`` of token ``token_id`` (see the module docstring); without a
    tokenizer, the id as text."""
    if tokenizer is None:
        text = str(token_id)
        return text, text.encode()
    return _pieces(tokenizer)(token_id)


@functools.lru_cache(maxsize=8)
def _pieces(tokenizer):
    byte_level = _is_byte_level(tokenizer)

    @functools.lru_cache(maxsize=65536)
    def piece(token_id: int) -> tuple[str, bytes]:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(token, str):
            data = b""
        elif (found := _BYTE_TOKEN.fullmatch(token)) is not None:
            data = bytes([int(found.group(1), 16)])
        elif byte_level and all(character in BYTE_OF_CHARACTER for character in token):
            data = bytes(BYTE_OF_CHARACTER[character] for character in token)
        else:
            data = token.replace("\u2581", " ").encode("utf-8")
        return data.decode("utf-8", errors="replace"), data

    return piece


def _is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's decoder is byte-level BPE's (a fast tokenizer's ``ByteLevel``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


PROMPT_TAIL_TOKENS = 5  # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET


@dataclass(frozen=True)
class PromptTail:
    """The last few non-special prompt ids a completion is decoded after, and their text."""

    ids: tuple[int, ...] = ()
    text: str = ""


def prompt_tail(tokenizer, prompt_ids: Sequence[int], size: int = PROMPT_TAIL_TOKENS) -> PromptTail:
    """The last ``size`` ids of ``prompt_ids`` that are not special tokens (a decode with
    ``skip_special_tokens`` drops those anyway; a chat prompt ends in some), with their text.
    Empty for a tokenizer without ``all_special_ids`` (a bare ``decode``, not a transformers
    tokenizer: nothing says which ids are special): its completion text stays the generated
    ids' decoding alone."""
    special = getattr(tokenizer, "all_special_ids", None)
    if special is None or size <= 0:
        return PromptTail()
    special = set(special)
    ids: list[int] = []
    for token in reversed(prompt_ids):
        if token not in special:
            ids.append(int(token))
            if len(ids) == size:
                break
    ids.reverse()
    if not ids:
        return PromptTail()
    return PromptTail(tuple(ids), tokenizer.decode(ids, skip_special_tokens=True))


def text_after(tokenizer, tail: PromptTail, generated: Sequence[int]) -> str:
    """The text of ``generated`` after the prompt: ``decode(tail.ids + generated)`` (special
    tokens skipped) less its first ``len(tail.text)`` characters, the tail's own text.

    Where the tail's text is not the start of the joint text (its last character was a part
    of one that the generated bytes complete, U+FFFD alone and a whole character together;
    or a decoder's clean-up joined across the boundary), the text past their common start:
    the character the generated ids completed belongs to the completion."""
    generated = [int(token) for token in generated]
    if not tail.ids:
        return tokenizer.decode(generated, skip_special_tokens=True)
    if not generated:
        return ""
    joint = tokenizer.decode([*tail.ids, *generated], skip_special_tokens=True)
    if joint.startswith(tail.text):
        return joint[len(tail.text) :]
    return joint[_common_start(tail.text, joint) :]


def _common_start(first: str, second: str) -> int:
    """The number of leading characters ``first`` and ``second`` share."""
    size = 0
    for one, other in zip(first, second, strict=False):
        if one != other:
            break
        size += 1
    return size
