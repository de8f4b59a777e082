"""A request's prompt as token ids, within the server's limits, never tokenizing unbounded text.

Tokenizing costs time and memory in proportion to the text (900 KB: about 3 s and hundreds of
MB that the allocator keeps), so a prompt is first measured in characters: a text longer than
``max_prompt_tokens * MAX_CHARS_PER_TOKEN`` characters is refused without being tokenized (400,
``code: context_length_exceeded``, as OpenAI and vLLM answer a prompt over the context), and only
texts within that bound reach the tokenizer. Call ``prompt_ids`` off the event loop
(``run_in_threadpool``): even a bounded text takes milliseconds to tokenize.
"""

from __future__ import annotations

import dataclasses

from lorakit.data.chat import ChatTemplateError, encode_chat, render_chat
from lorakit.serve.protocol import APIError, CompletionJob

__all__ = ["MAX_CHARS_PER_TOKEN", "fit_max_tokens", "max_prompt_chars", "prompt_ids"]

# A token is rarely more than a few characters (English text averages about 4 in SmolLM2's
# vocabulary, and its longest tokens, runs of spaces or '#', are 81). A prompt averaging more
# than 32 characters a token is a pathological one, refused by length.
MAX_CHARS_PER_TOKEN = 32


def max_prompt_chars(max_prompt_tokens: int) -> int:
    """The longest prompt text tokenized: ``max_prompt_tokens * MAX_CHARS_PER_TOKEN``."""
    return max_prompt_tokens * MAX_CHARS_PER_TOKEN


def prompt_ids(
    job: CompletionJob,
    tokenizer,
    *,
    max_prompt_tokens: int,
    max_positions: int,
    vocab_size: int | None = None,
):
    """The token ids of ``job``'s prompt (text, token ids, or chat messages rendered as
    everywhere, by ``lorakit.data.chat``): 400 (``context_length_exceeded``, as OpenAI's and
    vLLM's answer to a prompt over the context) when longer than ``max_prompt_tokens`` tokens
    (or than ``max_prompt_chars`` characters, before tokenizing), 400 when empty, out of the
    vocabulary, or leaving no room for ``max_tokens`` within ``max_positions`` (for a default
    ``max_tokens``, not given by the client, no room at all: ``fit_max_tokens`` shortens it).
    The errors name the fields the client sent: ``messages`` (a chat) or ``prompt``, and the
    length field ``job.max_tokens_name`` (``max_completion_tokens`` or ``max_tokens``).

    The vocabulary is ``[0, min(len(tokenizer), vocab_size))``, ``vocab_size`` the model's
    embedding rows (``Engine.vocab_size``; None: the tokenizer's alone); it bounds the prompt's
    ids (given or tokenized) and ``stop_token_ids`` (400 naming the field)."""
    limit = max_prompt_chars(max_prompt_tokens)
    if job.chat:
        given = sum(len(m["role"]) + len(m["content"]) for m in job.prompt)
        _check_chars(given, limit, max_prompt_tokens, "messages")
        try:
            text = render_chat(tokenizer, job.prompt, add_generation_prompt=True)
        except ChatTemplateError as error:  # e.g. Llama-2's "roles must alternate user/assistant"
            raise APIError(400, str(error), param="messages") from None
        _check_chars(len(text), limit, max_prompt_tokens, "messages")
        ids = encode_chat(tokenizer, text)
    elif isinstance(job.prompt, str):
        _check_chars(len(job.prompt), limit, max_prompt_tokens, "prompt")
        ids = tokenizer.encode(job.prompt)
    else:
        ids = job.prompt
    given = "messages" if job.chat else "prompt"  # the field holding the prompt
    if not ids:
        raise APIError(400, "the prompt is empty", param=given)
    if len(ids) > max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens; the limit is {max_prompt_tokens}",
            param=given,
            code="context_length_exceeded",
        )
    vocab = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    # given ids, and tokenized ones (a model may have fewer embedding rows than its tokenizer)
    _check_ids(ids, vocab, given)
    _check_ids(job.params.stop_token_ids, vocab, "stop_token_ids")
    room = max_positions - len(ids)  # (a default max_tokens is fitted to it: fit_max_tokens)
    if room < 1 or (job.max_tokens_given and job.params.max_tokens > room):
        name = job.max_tokens_name  # max_completion_tokens, if the chat client sent that
        raise APIError(
            400,
            f"prompt ({len(ids)} tokens) + {name} ({job.params.max_tokens}) exceeds the "
            f"model's {max_positions} positions; lower {name} or shorten the prompt",
            param=name,
            code="context_length_exceeded",
        )
    return ids


def _check_ids(ids, vocab: int, param: str) -> None:
    """400 naming ``param``, the first id outside ``[0, vocab)`` and its position."""
    for position, token in enumerate(ids):
        if not 0 <= token < vocab:
            raise APIError(
                400,
                f"'{param}' holds token id {token} (position {position}), outside the "
                f"vocabulary [0, {vocab}); give ids in that range",
                param=param,
            )


def _check_chars(chars: int, limit: int, max_prompt_tokens: int, param: str) -> None:
    if chars > limit:
        raise APIError(
            400,
            f"the prompt has {chars} characters, more than {limit} ({max_prompt_tokens} tokens "
            f"x {MAX_CHARS_PER_TOKEN} characters, far beyond the limit of {max_prompt_tokens} "
            "tokens); it was refused without tokenizing it. Shorten the prompt",
            param=param,
            code="context_length_exceeded",
        )


def fit_max_tokens(job: CompletionJob, prompt_tokens: int, max_positions: int) -> CompletionJob:
    """``job`` with a default ``max_tokens`` (one the client did not give) shortened to the
    positions the prompt leaves; a given one is kept (``prompt_ids`` refused it if too long)."""
    room = max_positions - prompt_tokens
    if job.max_tokens_given or job.params.max_tokens <= room:
        return job
    params = dataclasses.replace(job.params, max_tokens=room)
    return dataclasses.replace(job, params=params)
