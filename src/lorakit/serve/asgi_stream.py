"""Call an ASGI app in-process and get its response as it is sent: the status and headers
first, then each body chunk the app sends (server-sent events one by one).

``httpx.ASGITransport`` gathers the whole body before it returns, so a streamed completion
forwarded through it arrives at once; this driver does not. Closing the generator early (the
caller's client left) tells the app ``http.disconnect``, so lorakit's app cancels the request
in its engine, as it does for a client of ``lorakit serve`` that goes away.

    chunks = asgi_stream(app, "POST", "/v1/completions", body, {"content-type": "application/json"})
    start = await anext(chunks)          # ResponseStart(status, content_type)
    async for piece in chunks: ...       # bytes
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

__all__ = ["ResponseStart", "asgi_stream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseStart:
    """The response's status code and ``content-type`` (None when the app sent none)."""

    status: int
    content_type: str | None


async def asgi_stream(
    app, method: str, path: str, body: bytes, headers: Mapping[str, str]
) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``app`` on one HTTP request (``path`` may carry a ``?query``); yield a
    ``ResponseStart``, then the body's non-empty chunks in the order the app sends them.

    What the app raises is raised here after its messages, unless it had sent its whole
    response (the last ``http.response.body``, ``more_body`` false) before: Starlette's
    ``ServerErrorMiddleware`` sends its 500 and then re-raises for the server to log. As a
    server (uvicorn) does, that error is logged, and the complete 500 stands as the answer: a
    caller that forwards these pieces (the Ray Serve replica) would otherwise break the
    client's connection after the 500's body."""
    scope = _http_scope(method, path, headers)
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()  # the caller stopped reading: the client left
    request_read = False
    response_complete = False  # the app sent its last body message

    async def receive() -> dict:
        nonlocal request_read
        if not request_read:
            request_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal response_complete
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            response_complete = True
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)  # the app returned (or failed): no more messages

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type")
                yield ResponseStart(message["status"], content_type and content_type.decode())
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        try:
            await task  # re-raise what the app raised
        except Exception:
            if not response_complete:
                raise  # (the answer is cut short: the caller must not pass it on as whole)
            log.exception("Exception in ASGI application (after its whole response was sent)")
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)  # the app sees the disconnect, ends
            except Exception:  # (wait_for cancels it after 5 s)
                log.debug("the app failed after its client left", exc_info=True)


def _http_scope(method: str, path: str, headers: Mapping[str, str]) -> dict:
    """The ASGI ``http`` scope of one request to ``path`` (which may carry a ``?query``) from a
    loopback client."""
    path, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
