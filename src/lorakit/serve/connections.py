"""Limits on HTTP connections, so silent or slow clients cannot hold the server's sockets.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``), but a
connection that never sends a request, or sends half of one, stays open for good: a few hundred
of them exhaust the open-file limit and real requests time out. ``ConnectionLimits`` adds a
request timeout (``RequestTimeoutProtocol``: a client must deliver a whole request, head and body,
within ``timeout_request`` seconds of connecting or of its previous response, else the
connection is closed) and a bound on each request's head (``HeadBoundConnection``: h11 alone
bounds only a head still incomplete in its buffer, so a 100 KB head sent in one write was
parsed), a bound on the connections served at once (``max_connections``: a request on a newer
connection is answered 503), and sets uvicorn's other limits: the listen backlog.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "HeadBoundConnection", "RequestTimeoutProtocol"]

# The end of a request head, as h11 finds it: an empty line, "\r\n" or "\n" ended.
_HEAD_END = re.compile(b"\n\r?\n")
# h11's own default bound (uvicorn's when ``h11_max_incomplete_event_size`` is unset).
_H11_DEFAULT_HEAD_BYTES = 16 * 1024
# The order connections were opened in (RequestTimeoutProtocol.max_connections).
_OPENED = itertools.count()


class HeadBoundConnection(h11.Connection):
    """h11's server side, refusing a request head (request line + headers, up to and including
    the empty line that ends them) longer than ``max_head_bytes``, however it arrives.

    h11 bounds only an *incomplete* event: a head still without its empty line past
    ``max_incomplete_event_size`` buffered bytes is refused, but a whole one in the buffer is
    parsed whatever its size (a 100 KB head sent in one write was answered). Here, before each
    event is parsed while the client is between requests (``their_state`` IDLE: its next head
    starts the buffer), the head in the buffer is measured: longer than ``max_head_bytes``
    (its end further, or not yet there with more bytes buffered) raises ``RemoteProtocolError``
    (``head_refused`` set), which uvicorn answers 400 and closes. Each request's head is
    measured alone (keep-alive and pipelined requests), its body never."""

    def __init__(self, max_head_bytes: int, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.max_head_bytes = max_head_bytes
        self.head_refused = False

    def next_event(self):  # type: ignore[override]
        if self.their_state is h11.IDLE and self._head_too_long():
            self.head_refused = True
            raise h11.RemoteProtocolError(
                f"request head over {self.max_head_bytes} bytes", error_status_hint=431
            )
        return super().next_event()

    def _head_too_long(self) -> bool:
        """Whether the buffered head is longer than the bound: more bytes buffered than
        ``max_head_bytes`` and no head end within the first ``max_head_bytes`` of them."""
        buffered, _ = self.trailing_data  # (a copy; taken only between requests)
        limit = self.max_head_bytes
        return len(buffered) > limit and _HEAD_END.search(buffered, 0, limit) is None


class RequestTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with a request timeout: ``timeout_request`` seconds
    from connecting, or from the end of the previous response, to receive the whole next
    request; a connection still waiting for its request's head or body then is closed.
    Set ``timeout_request`` on a subclass (``ConnectionLimits.protocol``).

    Its h11 connection is a ``HeadBoundConnection``: a request head longer than uvicorn's
    ``h11_max_incomplete_event_size`` (``--max-header-bytes``; unset: h11's 16 KiB) is
    answered 400, saying so, and the connection closed, whether the head came in one write or
    many (h11 alone refuses only the latter).

    With ``max_connections`` N set (``ConnectionLimits.protocol``), a request is answered
    uvicorn's plain-text 503 (``Connection: close``, so the connection then closes) when N
    connections opened before its own are still open, idle keep-alive ones included: the N
    oldest open connections are served, newer ones are refused until older ones close. (Not
    uvicorn's ``limit_concurrency``: it refuses every request on every connection once N are
    open, so at most N-1 are served, and it counts a request's task until a loop iteration
    after its response, so keep-alive clients that ask again at once were refused too.)"""

    timeout_request: float = 30.0
    max_connections: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bound = self.config.h11_max_incomplete_event_size or _H11_DEFAULT_HEAD_BYTES
        self.conn = HeadBoundConnection(bound, max_incomplete_event_size=bound)
        self.opened = next(_OPENED)
        if self.max_connections is not None:
            self.served_app, self.app = self.app, self._app_within_limit

    async def _app_within_limit(self, scope, receive, send) -> None:
        """The app, or the 503 for a connection beyond the ``max_connections`` oldest."""
        older = sum(getattr(other, "opened", -1) < self.opened for other in self.connections)
        if older < self.max_connections:
            await self.served_app(scope, receive, send)
            return
        self.logger.warning(
            "refused a request: %d older connections are open (--max-connections)", older
        )
        await service_unavailable(scope, receive, send)

    def send_400_response(self, msg: str) -> None:
        if self.conn.head_refused:  # (uvicorn's message for any RemoteProtocolError is vague)
            msg = (
                f"the request head (request line and headers) is over {self.conn.max_head_bytes}"
                " bytes, this server's --max-header-bytes; send shorter headers"
            )
        super().send_400_response(msg)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer: asyncio.TimerHandle | None = None
        self._arm_request_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_request_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        super().connection_lost(exc)

    def _arm_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = self.loop.call_later(self.timeout_request, self._request_timed_out)

    def _request_timed_out(self) -> None:
        self._request_timer = None
        # IDLE: no request head yet (or not all of it); SEND_BODY: the body is still coming.
        # DONE: the request is in, the app is answering: the next response re-arms the timer.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.logger.debug("closing a connection that sent no whole request in time")
            self.transport.close()


@dataclass(frozen=True)
class ConnectionLimits:
    """What ``lorakit serve`` passes to uvicorn (the defaults are the CLI's).

    ``timeout_keep_alive``: seconds an idle connection stays open after a response;
    ``timeout_request``: seconds to send a whole request (see ``RequestTimeoutProtocol``);
    ``max_header_bytes``: the largest request head, request line + headers, in bytes (a longer
    one is answered 400 and its connection closed, however it was sent: ``HeadBoundConnection``;
    also h11's bound on an incomplete event, e.g. a chunked body's size line);
    ``max_connections``: the connections served at once; a request on a newer one is answered
    503 (see ``RequestTimeoutProtocol``); ``backlog``: connections the kernel queues before
    they are accepted.
    """

    timeout_keep_alive: float = 5.0
    timeout_request: float = 30.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 512
    backlog: int = 256

    def __post_init__(self) -> None:
        for name in ("timeout_keep_alive", "timeout_request"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_header_bytes", "max_connections", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def protocol(self) -> type[RequestTimeoutProtocol]:
        """``RequestTimeoutProtocol`` with this ``timeout_request`` and ``max_connections``."""
        return type(
            "RequestTimeoutProtocol",
            (RequestTimeoutProtocol,),
            {"timeout_request": self.timeout_request, "max_connections": self.max_connections},
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``."""
        return {
            "http": self.protocol(),
            "timeout_keep_alive": self.timeout_keep_alive,
            # RequestTimeoutProtocol bounds each request head by it too (HeadBoundConnection)
            "h11_max_incomplete_event_size": self.max_header_bytes,
            "limit_concurrency": None,  # the protocol bounds connections (max_connections)
            "backlog": self.backlog,
        }
