"""How the engine admits waiting requests into its running batch (``Engine`` inherits it).

At each token boundary ``_admit`` ends the cancelled requests (queued, or waiting for their
adapter's load), then moves requests from the head of the queue into the batch while it has
room: each holds its adapter in the bank (or is parked while a loader thread reads it); those
admitted are then prefilled together (``lorakit.serve.prefill``). A request that cannot start
yet (its adapter would exceed ``max_loras``, or the bank is full while a slot will be let go,
or its load found the bank full) waits in its place while requests behind it may go ahead,
until ``max_batch`` of them were admitted since it first waited: then it is *starving* and
nothing else is admitted until it runs (checked before each admission: no more than
``max_batch`` go ahead of it, besides requests that already hold their slot). The requests
that wait are counted as waiting all along (``max_waiting``, ``load``): held aside in
``_deferred`` while the queue is looked at, back in their places before the prefill. A request
whose adapter finds no room (every slot, or too many of the pages it needs, held by pinned
adapters), with nothing that will let one go, ends with ``no_adapter_slot`` and the bank's
message, which says which of the two ran out.

The engine's state this reads and changes: ``_waiting`` (the queue, under ``_wake``),
``_deferred`` (taken from its head at this boundary and still waiting, under ``_wake``),
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
        while the batch is full. The requests that must wait go back to their places in the
        queue before the admitted ones are prefilled: a long prefill once kept them out of it,
        counted nowhere, so ``max_waiting`` let more in and ``load`` showed none (review 31)."""
        with self._wake:
            cancelled = [r for r in self._waiting if r.cancelled]
            if cancelled:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        if self._cold is not None:
            cancelled += self._cold.take_cancelled()
        for request in cancelled:
            self._finish(request, "cancelled")
        self._ready = []  # admitted, prefilled together after the loop (``serve.prefill``)
        try:
            self._take_from_queue()
        finally:
            with self._wake:  # the head of the queue again, in their order
                self._waiting.extendleft(reversed(self._deferred))
                self._deferred = []
        self._prefill_all(list(self._ready))  # (each leaves ``_ready`` once it joined or ended)

    def _take_from_queue(self) -> None:
        """Look at the requests from the head of the queue while the batch has room. The one
        looked at, and those that must wait, are held in ``_deferred`` (counted as waiting by
        ``max_waiting`` and ``load``) until they leave the queue or ``_admit`` puts them back.
        After each admission the waiting ones are checked for starvation (``_note_starving``),
        before the next request may be admitted."""
        while self._waiting and len(self._running) + len(self._ready) < self.max_batch:
            with self._wake:
                request = self._waiting.popleft()
                self._deferred.append(request)
            if self._take(request):
                with self._wake:
                    self._deferred.pop()  # (the last: only this thread appends)
                for waiting in self._deferred:
                    self._note_starving(waiting)

    def _take(self, request: GenerationRequest) -> bool:
        """Admit ``request`` (into ``_ready``), park it while its adapter is loaded, or end it
        (cancelled, or its adapter cannot be had): True; False: it waits in its place while
        requests behind it may go ahead (``_note_blocked``)."""
        if request.cancelled:
            self._finish(request, "cancelled")
            return True
        if self._starving and request.id not in self._starving and request.slot < 0:
            return False  # a request kept waiting too long goes first (one already holding its
            # slot runs: waiting, it would keep that slot)
        if not self._adapter_fits(request):
            self._note_blocked(request)  # its adapter would exceed max_loras
            return False
        try:
            if not self._acquire_adapter(request):
                return True  # parked: its adapter is being loaded by a loader thread
        except BankFullError as error:
            if self._slot_will_free():
                self._note_blocked(request)  # retried once a slot is let go
                return False
            self._finish(request, "error", _no_room(request, error), kind=NO_ADAPTER_SLOT)
            return True
        except Exception as error:
            kind = failure_kind(error)
            if kind == INTERNAL:
                log.exception("loading adapter %r failed", request.adapter)
            message = str(error).strip("\"'") if isinstance(error, KeyError) else str(error)
            self._finish(request, "error", message or type(error).__name__, kind=kind)
            return True
        self._admissions += 1
        self._ready.append(request)
        self._starving.pop(request.id, None)  # admitted: the others may go ahead again
        return True

    def _note_blocked(self, request: GenerationRequest) -> None:
        """``request`` waits (for a slot, or for ``max_loras``) while requests behind it may go
        ahead: counted from the admissions of when it first had to wait (``_note_starving``)."""
        if request.blocked_since is None:
            request.blocked_since = self._admissions
        self._note_starving(request)

    def _note_starving(self, request: GenerationRequest) -> None:
        """Once ``max_batch`` requests were admitted since ``request`` first had to wait, it is
        *starving*: until it runs no other request is admitted, so that requests for resident
        adapters cannot keep its adapter out forever. Checked before every later admission
        (``_take_from_queue``): checked only when the request was passed over again, one token
        boundary could admit up to ``2 * max_batch - 2`` ahead of it (review 31)."""
        since = request.blocked_since
        if since is not None and self._admissions - since >= self.max_batch:
            self._starving[request.id] = request

    def _slot_will_free(self) -> bool:
        """A bank slot is held by something that will let it go: a running request, a load
        under way, or a queued request that holds its adapter but has not started yet (a
        finished load hands its slot to its requests before they run)."""
        if self._running or self._ready or (self._cold is not None and self._cold.in_flight):
            return True
        with self._wake:
            queued = [*self._deferred, *self._waiting]
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
