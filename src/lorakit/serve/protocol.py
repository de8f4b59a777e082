"""OpenAI wire format: request parsing with 4xx errors (a raw body into its JSON object:
``request_body``; the response bodies: ``bodies``; the error and its body: ``api_error``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorakit.serve.api_error import APIError, error_body
from lorakit.serve.sampling import MAX_LOGPROBS, InvalidSamplingParam, SamplingParams

__all__ = [
    "NEUTRAL_VALUES",
    "APIError",
    "CompletionJob",
    "error_body",
    "float_value",
    "parse_job",
]


@dataclass(frozen=True)
class CompletionJob:
    """A parsed completion or chat request."""

    model: str
    prompt: str | list[int] | list[dict[str, str]]
    params: SamplingParams
    stream: bool
    chat: bool
    max_tokens_given: bool = True
    """False: ``params.max_tokens`` is the default, which the prompt's room may shorten."""
    include_usage: bool = False
    """``stream_options.include_usage``: a stream ends with a chunk holding the usage (its
    ``choices`` empty) and every other chunk has ``"usage": null``, as OpenAI streams."""
    max_tokens_name: str = "max_tokens"
    """The length field the client sent (or would have): ``max_completion_tokens`` for a chat
    body that gave it (OpenAI's current name), else ``max_tokens``; errors about the output's
    length name it."""


def _field(
    body: dict[str, Any],
    name: str,
    kinds: tuple[type, ...],
    default: Any,
    *,
    required: bool = False,
) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_field")
        return default
    value = body[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise APIError(
            400, f"'{name}' must be a {expected}, got {type(value).__name__}", param=name
        )
    return value


def _content(content: object, index: int) -> str:
    """A message's text: a string, or OpenAI's list of text parts (``{"type": "text", "text":
    ...}``), joined with newlines as vLLM joins them; other parts (images) are a 400."""
    if isinstance(content, str):
        return content
    param = f"messages[{index}].content"
    if isinstance(content, list) and content:
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(text, str) for text in texts):
            return "\n".join(texts)
        raise APIError(
            400,
            f'\'{param}\' may hold only text parts ({{"type": "text", "text": ...}})',
            param=param,
        )
    raise APIError(400, f"'{param}' must be a string or a list of text parts", param=param)


def _prompt(body: dict[str, Any], chat: bool) -> str | list[int] | list[dict[str, str]]:
    if chat:
        messages = _field(body, "messages", (list,), None, required=True)
        ok = messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        )
        if not ok:
            raise APIError(
                400,
                "'messages' must be a non-empty list of {role, content} strings",
                param="messages",
            )
        return [
            {"role": m["role"], "content": _content(m.get("content"), index)}
            for index, m in enumerate(messages)
        ]
    prompt = _field(body, "prompt", (str, list), None, required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise APIError(
            400,
            "'prompt' must be a string, a list with one string, or a list of token ids",
            param="prompt",
        )
    return prompt


NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "truncate_prompt_tokens": (),
    # vLLM's sampling constraints: an output that ignored them would look valid but be
    # unconstrained. An empty list of banned words or of processors asks for nothing; an
    # empty ``allowed_token_ids`` or ``guided_choice`` would allow nothing, so only null is
    # neutral there, as for ``prompt_logprobs`` (0 asks for the prompt tokens' own)
    "bad_words": ([],),
    "bad_words_ids": ([],),
    "allowed_token_ids": (),
    "logits_processors": ([],),
    "guided_choice": (),
    "guided_regex": (),
    "guided_json": (),
    "guided_grammar": (),
    "structured_outputs": ({},),
    "prompt_logprobs": (),
}
"""OpenAI (and vLLM) request fields this server does not implement, with the values that ask
for nothing (null or absent too; ``()``: only those): any other value is a 400 naming the
field, never silently ignored (a client that asked for log-probabilities, a penalty or a
constraint would read a result computed without them). ``top_logprobs`` is refused the same
way on ``/v1/completions`` (whose ``logprobs`` is the count; chat implements it). Fields
named nowhere here are ignored, as OpenAI's extensions a server may not know."""


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    for name, neutral in NEUTRAL_VALUES.items():
        value = body.get(name)
        if value is None or any(type(value) is type(n) and value == n for n in neutral):
            continue
        raise _unsupported(name, neutral)
    if not chat and body.get("top_logprobs") is not None:
        raise _unsupported("top_logprobs", (), "on /v1/completions ('logprobs' is the count)")


def _unsupported(name: str, neutral: tuple[Any, ...], where: str = "") -> APIError:
    """The 400 of a field this server does not implement: leave it out or send ``neutral``."""
    instead = f" (or send {json.dumps(neutral[0])})" if neutral else ""
    return APIError(
        400,
        f"'{name}' is not supported by this server{' ' + where if where else ''}; leave it "
        f"out{instead}",
        param=name,
        code="unsupported_parameter",
    )


def parse_job(body: dict[str, Any], *, chat: bool, max_tokens_limit: int) -> CompletionJob:
    """Validate a /v1/completions or /v1/chat/completions body (400 on any bad field, and on a
    field of ``NEUTRAL_VALUES`` that asks for something this server does not do)."""
    model = _field(body, "model", (str,), None, required=True)
    _refuse_unsupported(body, chat)
    if _field(body, "n", (int,), 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_name = (
        "max_completion_tokens"
        if chat and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    given = body.get(max_name) is not None
    # unset: OpenAI's defaults, 16 for completions, the rest of the context for chat (within
    # the server's limit; prompts.prompt_ids shortens it to the room the prompt leaves)
    default = min(16, max_tokens_limit) if not chat else max_tokens_limit
    max_tokens = _field(body, max_name, (int,), default)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise APIError(
            400,
            f"'{max_name}'={max_tokens} is out of range [1, {max_tokens_limit}]",
            param=max_name,
        )
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or up to 4 of them", param="stop")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_float_field(body, "temperature", 1.0),
            top_p=_float_field(body, "top_p", 1.0),
            seed=_field(body, "seed", (int,), None),
            stop=tuple(stop),
            logprobs=_logprobs(body, chat),
            **_filter_fields(body),
            **_stopping_fields(body),
        )
    except InvalidSamplingParam as error:
        raise APIError(400, str(error), param=error.field) from None
    stream = _field(body, "stream", (bool,), False)
    include_usage = _include_usage(body, stream)
    prompt = _prompt(body, chat)
    return CompletionJob(model, prompt, params, stream, chat, given, include_usage, max_name)


def _filter_fields(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``top_k`` (an integer; -1 or 0: off), ``min_p`` (a number; 0: off) and
    ``stop_token_ids`` (a list of token ids) as ``SamplingParams`` fields (their ranges are
    checked there; the vocabulary's bound on the ids by ``prompts.prompt_ids``)."""
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise APIError(
            400, "'stop_token_ids' must be a list of integer token ids", param="stop_token_ids"
        )
    return {
        "top_k": _field(body, "top_k", (int,), 0),
        "min_p": _float_field(body, "min_p", 0.0),
        "stop_token_ids": tuple(stop_ids),
    }


def _stopping_fields(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's ``min_tokens`` (an integer, 0 to max_tokens), ``ignore_eos`` and
    ``include_stop_str_in_output`` (booleans) as ``SamplingParams`` fields (their meaning:
    ``SamplingParams``)."""
    return {
        "min_tokens": _field(body, "min_tokens", (int,), 0),
        "ignore_eos": _field(body, "ignore_eos", (bool,), False),
        "include_stop_str_in_output": _field(body, "include_stop_str_in_output", (bool,), False),
    }


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives each token's log-probability comes with (None: no logprobs):
    chat asks with ``logprobs: true`` and ``top_logprobs: n``, completions with
    ``logprobs: n``, as in OpenAI's API."""
    if not chat:
        return _field(body, "logprobs", (int,), None)
    wanted = _field(body, "logprobs", (bool,), False)
    top = _field(body, "top_logprobs", (int,), None)
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        # checked here, not by SamplingParams, so the message names the field chat sent
        raise APIError(
            400,
            f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}",
            param="top_logprobs",
        )
    return (top or 0) if wanted else None


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    """``stream_options.include_usage`` (false when absent); 400 for options without a stream,
    as OpenAI and vLLM answer."""
    options = _field(body, "stream_options", (dict,), None)
    if options is None:
        return False
    if not stream:
        raise APIError(
            400, "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    include = options.get("include_usage", False)
    if include is not None and not isinstance(include, bool):
        raise APIError(
            400, "'stream_options.include_usage' must be a boolean", param="stream_options"
        )
    return bool(include)


def _float_field(body: dict[str, Any], name: str, default: float) -> float:
    """A number field as a float (``float_value``)."""
    return float_value(_field(body, name, (int, float), default), name)


def float_value(value: int | float, name: str) -> float:
    """``value`` as a float; an integer too large for a float (JSON allows any, e.g. 10**400)
    is a 400 naming the field ``name``."""
    try:
        return float(value)
    except OverflowError:
        raise APIError(
            400, f"'{name}' is out of range: give a number within +-1.8e308", param=name
        ) from None
