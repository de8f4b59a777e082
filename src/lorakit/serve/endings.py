"""How the engine ends requests (``Engine`` inherits it).

``_finish`` ends one request, once (a second call does nothing): its adapter's hold on its bank
slot released, a cancellation counted (``stats.cancelled``), and its last event delivered with
the finish reason ("stop", "length", "cancelled", or "error" with its message and kind), the
text and ids not yet streamed, and the usage counts (prompt and completion tokens). ``_cancel_all``
ends every request the engine has, with ``cancelled``, when it stops: queued, parked on an
adapter load, being prefilled or running.

The engine's state this reads and changes: ``bank``, ``stats``, ``_starving``, ``_cold``,
``_waiting`` (under ``_wake``), ``_running``, ``_ready``, ``_cache``, ``max_batch``.
"""

from __future__ import annotations

import collections

from lorakit.serve.kv import BatchedCache
from lorakit.serve.requests import Event, GenerationRequest

__all__ = ["Endings"]


class Endings:
    """The request-ending half of ``lorakit.serve.engine.Engine`` (see the module docstring)."""

    def _finish(
        self,
        request: GenerationRequest,
        reason: str,
        error: str | None = None,
        *,
        kind: str | None = None,
        text: str = "",
        ids=(),
        logprobs=(),
    ) -> None:
        """End ``request`` with ``reason`` (see the module docstring); nothing if it ended."""
        if request.done:
            return
        request.done = True
        self._starving.pop(request.id, None)
        self.stats.cancelled += reason == "cancelled"
        if request.adapter is not None and request.slot >= 0 and self.bank is not None:
            self.bank.release(request.adapter)
        prompt_tokens, completion_tokens = len(request.prompt_ids), len(request.generated)
        request.deliver(
            Event(
                text,
                tuple(ids),
                reason,
                error,
                prompt_tokens,
                completion_tokens,
                kind,
                tuple(logprobs),
            )
        )

    def _cancel_all(self) -> None:
        """Stopped: every request queued, parked on a load, being prefilled or running ends
        with ``cancelled`` (on the loop's thread as it ends, or in ``stop()`` when there is
        none)."""
        parked = self._cold.drain() if self._cold is not None else []
        with self._wake:
            waiting, self._waiting = [*self._waiting], collections.deque()
        for request in [*self._running, *self._ready, *waiting, *parked]:
            self._finish(request, "cancelled")
        self._running, self._ready = [], []
        self._cache = BatchedCache(max_rows=self.max_batch)
