"""OpenAI response bodies: whole responses, stream chunks, usage, and log-probabilities in the
chat and the legacy completion formats (``protocol`` parses requests; ``responses`` sends
these)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from lorakit.serve.protocol import CompletionJob
from lorakit.serve.sampling import TokenLogprob

__all__ = [
    "LOWEST_LOGPROB",
    "Piece",
    "chat_chunk",
    "chat_logprobs",
    "completion_chunk",
    "completion_logprobs",
    "full_response",
    "new_id",
    "usage",
    "usage_chunk",
]


LOWEST_LOGPROB = -9999.0
"""What a log-probability of -inf (a token the model rules out) is sent as: JSON has no
infinities (vLLM sends the same); so is a NaN (a broken adapter's logits), which JSON has not
either (it made the response fail to encode)."""


def _sent(logprob: float) -> float:
    """``logprob`` as JSON can carry it: at least ``LOWEST_LOGPROB``, a NaN as that too."""
    return logprob if logprob >= LOWEST_LOGPROB else LOWEST_LOGPROB  # (NaN >= x is False)


def _entry(piece: tuple[str, bytes], logprob: float) -> dict[str, Any]:
    text, data = piece
    return {"token": text, "logprob": _sent(logprob), "bytes": list(data)}


Piece = Callable[[int], tuple[str, bytes]]
"""A token id's ``(text, exact bytes)`` (``lorakit.serve.token_pieces.token_piece``)."""


def chat_logprobs(entries: Sequence[TokenLogprob], piece: Piece) -> dict:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for entry in entries:
        item = _entry(piece(entry.token_id), entry.logprob)
        item["top_logprobs"] = [_entry(piece(i), lp) for i, lp in entry.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(entries: Sequence[TokenLogprob], piece: Piece, offset: int = 0) -> dict:
    """OpenAI's legacy completion ``logprobs``: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (``{text: logprob}`` per token: ``_top_with_sampled``) and
    ``text_offset`` (each token's character offset in the completion, counted over the
    tokens' texts from ``offset``)."""
    tokens = [piece(entry.token_id)[0] for entry in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_sent(entry.logprob) for entry in entries],
        "top_logprobs": [_top_with_sampled(entry, piece) for entry in entries],
        "text_offset": offsets,
    }


def _top_with_sampled(entry: TokenLogprob, piece: Piece) -> dict[str, float]:
    """One token's legacy ``top_logprobs``: its n alternatives' ``{text: logprob}``, most
    likely first, and always the sampled token's own, appended when it is not among them, so
    up to n + 1 entries (``logprobs: 0``: just the sampled token). OpenAI: "The API will
    always return the logprob of the sampled token, so there may be up to logprobs+1
    elements"; vLLM does the same. Keyed by text, the sampled token's value wins over an
    alternative with the same text (``top[tokens[i]] == token_logprobs[i]`` always holds)."""
    top = {piece(i)[0]: _sent(lp) for i, lp in entry.top}
    top[piece(entry.token_id)[0]] = _sent(entry.logprob)
    return top


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_chunk(request_id: str, job: CompletionJob, counts: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the request's usage."""
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    return _envelope(request_id, kind, job.model, [], usage=counts)


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _envelope(request_id: str, kind: str, model: str, choices: list, **extra) -> dict[str, Any]:
    """What every response and chunk holds around its choices (``extra``: e.g. ``usage``)."""
    body = {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    return body | extra


def completion_chunk(
    request_id: str, model: str, text: str, finish_reason: str | None, logprobs=None
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(request_id, "text_completion", model, [choice])


def chat_chunk(
    request_id: str, model: str, delta: dict[str, str], finish_reason: str | None, logprobs=None
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(request_id, "chat.completion.chunk", model, [choice])


def full_response(
    request_id: str,
    job: CompletionJob,
    text: str,
    finish_reason: str,
    usage: dict[str, int],
    logprobs: dict | None = None,
) -> dict[str, Any]:
    if job.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        kind = "text_completion"
    return _envelope(request_id, kind, job.model, [choice], usage=usage)
