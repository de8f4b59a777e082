"""Limits on HTTP connections, so silent or slow clients cannot hold the server's sockets.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``), but a
connection that never sends a request, or sends half of one, stays open for good: a few hundred
of them exhaust the open-file limit and real requests time out. ``ConnectionLimits`` adds a
request timeout (``RequestTimeoutProtocol``: a client must deliver a whole request, head and body,
within ``timeout_request`` seconds of connecting or of its previous response, else the
connection is closed), and sets uvicorn's other limits: the request head's size (h11), the
connections and requests served at once (more are answered 503), and the listen backlog.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "RequestTimeoutProtocol"]


class RequestTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with a request timeout: ``timeout_request`` seconds
    from connecting, or from the end of the previous response, to receive the whole next
    request; a connection still waiting for its request's head or body then is closed.
    Set ``timeout_request`` on a subclass (``ConnectionLimits.protocol``)."""

    timeout_request: float = 30.0

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
    ``max_header_bytes``: the largest request line + headers (h11's incomplete-event bound; a
    larger head is answered 400); ``max_connections``: open connections and running requests
    at most, beyond which uvicorn answers 503 (uvicorn's ``limit_concurrency``); ``backlog``:
    connections the kernel queues before they are accepted.
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
        """``RequestTimeoutProtocol`` with this ``timeout_request``."""
        return type(
            "RequestTimeoutProtocol",
            (RequestTimeoutProtocol,),
            {"timeout_request": self.timeout_request},
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``."""
        return {
            "http": self.protocol(),
            "timeout_keep_alive": self.timeout_keep_alive,
            "h11_max_incomplete_event_size": self.max_header_bytes,
            "limit_concurrency": self.max_connections,
            "backlog": self.backlog,
        }
