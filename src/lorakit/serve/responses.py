"""Answers to completion requests: the whole response, or server-sent events, from the engine's
events; and the HTTP error a failed request maps to.

The request is submitted, and its first event awaited, before any response starts: a request
that fails before its first token (its adapter unloaded after it was queued, or unreadable; the
engine stopped; the waiting queue full) gets a JSON error with its own status code, not a 200
and a broken stream.

A client that disconnects cancels its request, streaming or not: a task awaits the ASGI
``http.disconnect`` message while the request is generated and then cancels it, so the engine
drops it at the next token boundary (freeing its KV rows and adapter slot) instead of
generating for nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from lorakit.serve import bodies, protocol
from lorakit.serve.engine import Engine, EngineStoppedError, QueueFullError, QueuePlace
from lorakit.serve.protocol import APIError, CompletionJob
from lorakit.serve.requests import (
    ADAPTER_NOT_FOUND,
    INVALID_ADAPTER,
    NO_ADAPTER_SLOT,
    Event,
    EventStream,
)
from lorakit.serve.token_pieces import token_piece

__all__ = ["RETRY_AFTER_SECONDS", "answer", "failure", "model_not_found", "queue_place"]

log = logging.getLogger(__name__)
_DONE = ("stop", "length")
RETRY_AFTER_SECONDS = 1  # the Retry-After of a 429 (waiting queue full)

Receive = Callable[[], Awaitable[dict]]


def model_not_found(model: str) -> APIError:
    """The one 404 for a request naming an adapter that is not served: never loaded, or
    unloaded before the request came, while it was queued, or while its adapter was being
    read (review 38: four wordings, one of them listing every registered adapter). It lists
    no names (a server may hold thousands): ``GET /v1/models`` does."""
    return APIError(
        404,
        f"the model {model!r} does not exist: unknown adapter {model!r} (never loaded, or "
        "unloaded); see GET /v1/models",
        param="model",
        code="model_not_found",
    )


def failure(event: Event, model: str) -> APIError:
    """The HTTP error for a request that ended without "stop" or "length"."""
    if event.error_kind == ADAPTER_NOT_FOUND:
        return model_not_found(model)
    if event.error_kind == INVALID_ADAPTER:
        return APIError(
            400, f"the adapter {model!r} cannot be served: {event.error}", param="model"
        )
    if event.error_kind == NO_ADAPTER_SLOT:
        return APIError(503, str(event.error), type="server_busy")
    reason = event.error or event.finish_reason
    return APIError(503, f"generation failed: {reason}", type="server_error")


async def answer(
    engine: Engine,
    job: CompletionJob,
    prompt_ids: list[int],
    adapter: str | None,
    receive: Receive | None = None,
    place: QueuePlace | None = None,
):
    """A JSON response (or ``StreamingResponse`` when ``job.stream``); raises ``APIError``
    when the request fails before its first token, 429 (with ``Retry-After``) when the engine's
    waiting queue is full. ``receive``: the request's ASGI receive, watched for the client's
    disconnect (None: not watched); ``place``: the queue place ``queue_place`` held for it
    (the request takes it when it is submitted)."""
    try:
        events = engine.open_stream(prompt_ids, adapter, job.params, place)
    except EngineStoppedError as error:
        raise APIError(503, str(error), type="server_error") from None
    except QueueFullError as error:
        raise _busy(error) from None
    watcher = _cancel_on_disconnect(receive, events)
    streaming = False
    try:
        first = await anext(events)
        if first.finish_reason is not None and first.finish_reason not in _DONE:
            raise failure(first, job.model)
        if job.stream:
            streaming = True
            return StreamingResponse(
                _sse(job, first, events, watcher, _token_pieces(engine.tokenizer)),
                media_type="text/event-stream",
                background=BackgroundTask(events.cancel),  # also when the client disconnects
            )
        return await _complete(job, first, events, _token_pieces(engine.tokenizer))
    except BaseException:  # the server is cancelling this handler, or it failed
        events.cancel()
        raise
    finally:
        if not streaming and watcher is not None:
            watcher.cancel()


def queue_place(engine: Engine) -> QueuePlace:
    """A place held in the engine's waiting queue (``Engine.reserve``) for a request that is
    about to load its adapter, or the 429 ``answer`` gives when the queue is full, raised now:
    a request refused this way loads no adapter and evicts none, and requests between this
    check and their submit count against ``max_waiting``. Use it as a context manager around
    the adapter load and ``answer(..., place=...)``: the place is given back on any error."""
    try:
        return engine.reserve()
    except QueueFullError as error:
        raise _busy(error) from None


def _busy(error: QueueFullError) -> APIError:
    return APIError(
        429,
        f"the server is busy: {error}",
        type="server_busy",
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _cancel_on_disconnect(receive: Receive | None, events: EventStream) -> asyncio.Task | None:
    """A task that cancels the request when ``receive`` says the client disconnected (once the
    body is read, receive blocks until the client leaves or the response is complete)."""
    if receive is None:
        return None

    async def watch() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a receive that fails: the connection is gone as well
            log.debug("receive failed while watching for a disconnect", exc_info=True)
        events.cancel()  # (no effect on a request that has already finished)

    return asyncio.ensure_future(watch())


def _token_pieces(tokenizer) -> bodies.Piece:
    """A token id's ``(text, exact bytes)``, as logprobs name tokens (``token_pieces``)."""
    return lambda token_id: token_piece(tokenizer, token_id)


def _logprobs(job: CompletionJob, entries, pieces, offset: int = 0) -> dict | None:
    """The choice's ``logprobs`` for ``entries`` in the chat or the completion format (None
    when the request asked for none)."""
    if job.params.logprobs is None:
        return None
    if job.chat:
        return bodies.chat_logprobs(entries, pieces)
    return bodies.completion_logprobs(entries, pieces, offset)


async def _complete(job: CompletionJob, first: Event, events: EventStream, pieces) -> dict:
    texts, entries, last = [first.text], list(first.logprobs), first
    async for event in events:
        texts.append(event.text)
        entries += event.logprobs
        last = event
    if last.finish_reason not in _DONE:
        raise failure(last, job.model)
    usage = bodies.usage(last.prompt_tokens, last.completion_tokens)
    return bodies.full_response(
        bodies.new_id(job.chat),
        job,
        "".join(texts),
        last.finish_reason,
        usage,
        _logprobs(job, entries, pieces),
    )


async def _sse(
    job: CompletionJob,
    first: Event,
    events: EventStream,
    watcher: asyncio.Task | None,
    pieces: bodies.Piece,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format (with ``job.include_usage``, a last chunk of
    usage), then ``data: [DONE]``. A request failing after its first token ends with an error
    object in the stream (the status is sent)."""
    request_id = bodies.new_id(job.chat)
    offset = 0  # characters of the tokens' texts so far (the legacy text_offset)

    def chunk(text: str | None, finish: str | None, entries=()) -> str:
        nonlocal offset
        logprobs = _logprobs(job, entries, pieces, offset) if entries else None
        offset += sum(len(pieces(entry.token_id)[0]) for entry in entries)
        if job.chat:
            delta = (
                {"role": "assistant", "content": ""}
                if text is None
                else ({"content": text} if text else {})
            )
            payload = bodies.chat_chunk(request_id, job.model, delta, finish, logprobs)
        else:
            payload = bodies.completion_chunk(request_id, job.model, text or "", finish, logprobs)
        if job.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    async def everything() -> AsyncIterator[Event]:
        yield first
        async for event in events:
            yield event

    try:
        if job.chat:
            yield chunk(None, None)
        async for event in everything():
            if event.text or event.logprobs:
                yield chunk(event.text, None, event.logprobs)
            if event.finish_reason in _DONE:
                yield chunk("", event.finish_reason)
                if job.include_usage:
                    counts = bodies.usage(event.prompt_tokens, event.completion_tokens)
                    payload = bodies.usage_chunk(request_id, job, counts)
                    yield f"data: {json.dumps(payload)}\n\n"
            elif event.finish_reason is not None:
                yield f"data: {json.dumps(protocol.error_body(failure(event, job.model)))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        events.cancel()
        if watcher is not None:
            watcher.cancel()
