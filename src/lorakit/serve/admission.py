"""How the engine admits waiting requests into its running batch (``Engine`` inherits it).

At each token boundary ``_admit`` ends the cancelled requests (queued, or waiting for their
adapter's load), then moves requests from the head of the queue into the batch while it has
room: each holds its adapter in the bank (or is parked while a loader thread reads it); those
admitted are then prefilled together (``lorakit.serve.prefill``). A request that cannot start
yet (its adapter would exceed ``max_loras``, or the bank is full while a slot will be let go,
or its load found the bank full) waits in its place while requests behind it may go ahead,
until ``max_batch`` of them were admitted since it first waited: then it is *starving* and
nothing else is admitted until it runs. A request whose adapter finds no room (every slot, or
too many of the pages it needs, held by pinned adapters), with nothing that will let one go,
ends with ``no_adapter_slot`` and the bank's message, which says which of the two ran out.

The engine's state this reads and changes: ``_waiting`` (the queue, under ``_wake``),
``_running``, ``_ready`` (admitted at this boundary, not yet prefilled), ``_starving``,
``_admissions``, ``bank``, ``_cold``, ``max_batch``, ``max_loras``, and its ``_prefill_all``
and ``_finish``.
"""

from __future__ import annotations

import collections
import logging

from lorakit.serve.bank import BankFullError
from lorakit.serve.requests import INTERNAL, NO_ADAPTER_SLOT, GenerationRequest, failure_kind

__all__ = ["Admission"]

log = logging.getLogger("lorakit.serve.engine")


class Admission:
    """The admission half of ``lorakit.serve.engine.Engine`` (see the module docstring)."""

    def _admit(self) -> None:
        """Move waiting requests into the batch. Whatever goes wrong while one request's adapter
        is read, checked or loaded, or its prompt prefilled, ends that request with an error
        event and touches no other request. Cancelled requests leave the queue at once, even
        while the batch is full."""
        with self._wake:
            cancelled = [r for r in self._waiting if r.cancelled]
            if cancelled:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        if self._cold is not None:
            cancelled += self._cold.take_cancelled()
        for request in cancelled:
            self._finish(request, "cancelled")
        deferred: list[GenerationRequest] = []
        self._ready = []  # admitted, prefilled together after the loop (``serve.prefill``)
        while self._waiting and len(self._running) + len(self._ready) < self.max_batch:
            with self._wake:
                request = self._waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            if self._starving and request.id not in self._starving and request.slot < 0:
                deferred.append(request)  # a request kept waiting too long goes first (one
                continue  # already holding its slot runs: waiting, it would keep that slot)
            if not self._adapter_fits(request):
                self._defer(request, deferred)  # its adapter would exceed max_loras
                continue
            try:
                if not self._acquire_adapter(request):
                    continue  # parked: its adapter is being loaded by a loader thread
            except BankFullError as error:
                if self._slot_will_free(deferred):
                    self._defer(request, deferred)  # retried once a slot is let go
                else:
                    self._finish(request, "error", _no_room(request, error), kind=NO_ADAPTER_SLOT)
                continue
            except Exception as error:
                kind = failure_kind(error)
                if kind == INTERNAL:
                    log.exception("loading adapter %r failed", request.adapter)
                message = str(error).strip("\"'") if isinstance(error, KeyError) else str(error)
                self._finish(request, "error", message or type(error).__name__, kind=kind)
                continue
            self._admissions += 1
            self._ready.append(request)
            self._starving.pop(request.id, None)  # admitted: the others may go ahead again
        self._prefill_all(list(self._ready))  # (each leaves ``_ready`` once it joined or ended)
        with self._wake:
            self._waiting.extendleft(reversed(deferred))

    def _defer(self, request: GenerationRequest, deferred: list[GenerationRequest]) -> None:
        """``request`` waits (for a slot, or for ``max_loras``) while requests behind it may go
        ahead. Once ``max_batch`` requests were admitted since it first had to wait, it is
        *starving*: until it runs no other request is admitted, so that requests for resident
        adapters cannot keep its adapter out forever."""
        deferred.append(request)
        self._note_blocked(request)

    def _note_blocked(self, request: GenerationRequest) -> None:
        """Count ``request`` as kept waiting since the admissions of now (``_defer``); starving
        once ``max_batch`` requests were admitted since."""
        if request.blocked_since is None:
            request.blocked_since = self._admissions
        if self._admissions - request.blocked_since >= self.max_batch:
            self._starving[request.id] = request

    def _slot_will_free(self, deferred: list[GenerationRequest]) -> bool:
        """A bank slot is held by something that will let it go: a running request, a load
        under way, or a queued request that holds its adapter but has not started yet (a
        finished load hands its slot to its requests before they run)."""
        if self._running or self._ready or (self._cold is not None and self._cold.in_flight):
            return True
        with self._wake:
            queued = [*deferred, *self._waiting]
        return any(r.slot >= 0 for r in queued)

    def _adapter_fits(self, request: GenerationRequest) -> bool:
        """The request's adapter is in the running batch, or the batch has fewer than
        ``max_loras`` distinct adapters."""
        if self.max_loras is None or request.adapter is None:
            return True
        running = {r.adapter for r in [*self._running, *self._ready] if r.adapter is not None}
        return request.adapter in running or len(running) < self.max_loras

    def _acquire_adapter(self, request: GenerationRequest) -> bool:
        """Hold the request's adapter in the bank; False: not resident, parked for a load
        (re-raises a failed load's exception)."""
        if request.load_error is not None:
            error, request.load_error = request.load_error, None
            if not (isinstance(error, BankFullError) and self.bank.room_for(request.adapter)):
                raise error  # (a full bank that has room again since: load again)
            self._note_blocked(request)  # its load found no room: it has been waiting since
        if request.adapter is None or request.slot >= 0:
            return True
        if self.bank is None:
            raise KeyError(f"adapter {request.adapter!r}: this engine serves no bank of adapters")
        slot = self.bank.try_acquire(request.adapter)
        if slot is None and self._cold is None:
            slot = self.bank.acquire(request.adapter)  # KeyError: not loaded, no loader
        if slot is None:
            self._cold.park(request)
            return False
        request.slot = slot
        return True


def _no_room(request: GenerationRequest, error: BankFullError) -> str:
    """The error of a request whose adapter finds no room and nothing that will make some: the
    adapter's name and the bank's own account (``Residency.require_room``: the slots or the
    pages that ran out, with their numbers and what to change), not a fixed "all pinned", which
    was wrong when slots were free and the pages were short (review 31)."""
    return f"adapter {request.adapter!r} cannot be loaded now: {error}"
