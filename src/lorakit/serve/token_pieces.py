"""The text and the exact bytes of one token, as OpenAI's ``logprobs`` give them.

Decoding a token alone (``tokenizer.decode([id])``) loses what only its neighbours settle: a
byte-level BPE token holding part of a character decodes to U+FFFD, and some decoders drop a
token's leading space. The bytes come from the vocabulary instead:

- byte-level BPE (GPT-2, Llama 3, SmolLM2): each character of the token stands for one byte,
  by GPT-2's byte-to-character table (``BYTE_OF_CHARACTER``);
- SentencePiece byte fallback: a token ``<0xE2>`` is that byte;
- otherwise the token's text, with SentencePiece's ``▁`` read as a space.

The text is those bytes decoded as UTF-8 (U+FFFD for a part of a character, whose bytes are
still exact).
"""

from __future__ import annotations

import functools
import re

__all__ = ["BYTE_OF_CHARACTER", "token_piece"]


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
