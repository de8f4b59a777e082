"""How requests reach the engine's waiting queue (``Engine`` inherits it): ``submit`` from any
thread with a callback, ``open_stream`` / ``stream`` from asyncio, ``generate`` blocking; and the
queue's bound, ``max_waiting``, with the places a server holds for requests about to be submitted
(``reserve``, ``QueuePlace``): a request checked against the bound before it loads its adapter
keeps its place until it is queued, so requests refused with a 429 load no adapter and evict none.

The engine's state this reads and changes: ``_waiting`` (the queue, under ``_wake``),
``_deferred`` (requests the admission holds aside at a token boundary, still waiting),
``_reserved``, ``_stopping``, ``max_waiting``, ``vocab_size``, ``position_limit`` and its ``_parked``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence

from lorakit.serve.requests import (
    EngineStoppedError,
    Event,
    EventStream,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    check_token_ids,
)
from lorakit.serve.sampling import SamplingParams

__all__ = ["QueuePlace", "Submission"]


class Submission:
    """The submitting half of ``lorakit.serve.engine.Engine`` (see the module docstring)."""

    def submit(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        on_event: Callable[[Event], None],
    ) -> RequestHandle:
        """Queue a request; ``on_event`` is called from the engine thread for every piece.

        Before ``start()`` the request waits for it; after ``stop()`` this raises
        ``EngineStoppedError``; with ``max_waiting`` requests already queued or places held by
        ``reserve()`` (cancelled requests not counted; those parked on an adapter load, and
        those waiting for ``max_loras`` or a slot while others are admitted, counted),
        ``QueueFullError``; a prompt that is empty or holds an id outside the model's
        vocabulary ``[0, vocab_size)``, or a stop token id outside it, ``ValueError`` naming
        the id and its position; a prompt whose last new token would need a row past a learned
        position table (prompt + max_tokens - 1 positions fed; ``position_limit``),
        ``ValueError`` (it would fail the batch it ran in)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token.")
        fed = len(prompt_ids) + params.max_tokens - 1
        if self.position_limit is not None and fed > self.position_limit:
            raise ValueError(
                f"the prompt's {len(prompt_ids)} tokens and max_tokens {params.max_tokens} "
                f"feed {fed} positions; the model's learned position table has "
                f"{self.position_limit}: shorten the prompt or lower max_tokens."
            )
        check_token_ids(prompt_ids, "prompt token", self.vocab_size)
        check_token_ids(params.stop_token_ids, "stop_token_ids", self.vocab_size)
        request = GenerationRequest(list(prompt_ids), adapter, params, on_event)
        with self._wake:
            if self._stopping:
                raise EngineStoppedError(
                    "the generation engine is stopped (the server is shutting down); no "
                    "request can be served."
                )
            self._refuse_when_full()
            self._waiting.append(request)
            self._wake.notify_all()
        return RequestHandle(request, self._notify)

    def reserve(self) -> QueuePlace:
        """Hold a place in the waiting queue for a request about to be submitted (a cheap check
        before it loads its adapter, so that a request refused loads none and evicts none);
        ``QueueFullError`` when ``submit`` would refuse a request now. The place counts against
        ``max_waiting`` until ``open_stream(..., place)`` queues the request in it or it is
        released (a context manager: released on exit, also when the request failed before it
        was submitted)."""
        with self._wake:
            self._refuse_when_full()
            self._reserved += 1
        return QueuePlace(self)

    @property
    def reserved(self) -> int:
        """Queue places held by ``reserve()`` and not yet taken by a request or released."""
        return self._reserved

    def _refuse_when_full(self) -> None:
        """``QueueFullError`` when ``max_waiting`` requests are queued or reserved (cancelled
        ones not counted; those parked on an adapter load counted, and those the admission
        holds aside at a token boundary, ``_deferred``: uncounted during a long prefill, they
        once let the queue grow past the limit, review 31); called under ``_wake``."""
        if self.max_waiting is None:
            return
        waiting = [*self._waiting, *self._deferred]
        queued = sum(not r.cancelled for r in waiting) + self._parked()
        if queued + self._reserved >= self.max_waiting:
            held = f" and {self._reserved} more are on their way" if self._reserved else ""
            raise QueueFullError(
                f"{queued} requests are already waiting{held} (the limit is "
                f"{self.max_waiting}); retry later"
            )

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def open_stream(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        place: QueuePlace | None = None,
    ) -> EventStream:
        """Submit now (errors such as ``EngineStoppedError`` raise here, before any event;
        ``place``: a place from ``reserve()``, given to this request: released and the request
        queued in one step under the lock, so no other request can take it meanwhile); an async
        iterator of the request's events. Call from a running event loop."""

        def submit(on_event: Callable[[Event], None]) -> RequestHandle:
            with self._wake:  # (re-entered by ``submit``)
                if place is not None:
                    place.take()
                return self.submit(prompt_ids, adapter, params, on_event)

        return EventStream(submit)

    async def stream(
        self, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams
    ) -> AsyncIterator[Event]:
        """Async iterator of the request's events (cancels the request if the consumer leaves)."""
        events = self.open_stream(prompt_ids, adapter, params)
        try:
            async for event in events:
                yield event
        finally:
            events.cancel()

    def generate(
        self, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams
    ) -> tuple[list[int], str, Event]:
        """Blocking: (generated ids, text, last event)."""
        events: list[Event] = []
        finished = threading.Event()

        def collect(event: Event) -> None:
            events.append(event)
            if event.finish_reason is not None:
                finished.set()

        self.submit(prompt_ids, adapter, params, collect)
        finished.wait()
        ids = [i for e in events for i in e.token_ids]
        return ids, "".join(e.text for e in events), events[-1]


class QueuePlace:
    """A place in an ``Engine``'s waiting queue held by ``Engine.reserve()``: the request that
    ``Engine.open_stream(..., place)`` queues takes it, or ``release()`` (idempotent; also on
    leaving a ``with`` block) gives it back."""

    def __init__(self, engine: Submission) -> None:
        self._engine = engine
        self._held = True

    def take(self) -> bool:
        """Give the place up (to the request being queued); False when it was no longer held.
        Called under the engine's ``_wake``."""
        held, self._held = self._held, False
        if held:
            self._engine._reserved -= 1
        return held

    def release(self) -> None:
        """Give the place back (no-op once taken or released)."""
        with self._engine._wake:
            self.take()

    def __enter__(self) -> QueuePlace:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
