"""Cold adapter loads off the engine's decode thread.

A request whose adapter is not in the bank is *parked* here: a small pool of loader threads
reads, checks and writes the adapter into the bank (``AdapterBank.acquire`` with the loader, so
no other load can evict it before its requests take it), while the engine keeps decoding the
running batch and admitting requests whose adapters are resident. When the load ends, every
request parked on that adapter has acquired the adapter (``request.slot`` set) or carries the
load's exception (``request.load_error``), and goes back to the engine (``on_ready``), which
admits it at its next token boundary. One load per adapter at a time, whatever the number of
requests waiting for it, and whether or not they were cancelled meanwhile: the adapters with a
load under way are kept apart from the requests waiting (a request for an adapter whose load
runs waits for that load, even when every request that started it was cancelled).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from lorakit.serve.bank import AdapterBank
from lorakit.serve.lazy_loads import Loader
from lorakit.serve.openmp import release_idle_team
from lorakit.serve.requests import GenerationRequest

__all__ = ["ColdLoads"]

log = logging.getLogger(__name__)


class ColdLoads:
    """Adapter loads in ``workers`` background threads, and the requests waiting for them.

    ``on_ready(requests)`` is called from a loader thread when a load ended (successfully or
    not); the engine puts those requests back at the head of its queue.
    """

    def __init__(
        self,
        bank: AdapterBank,
        loader: Loader,
        on_ready: Callable[[list[GenerationRequest]], None],
        *,
        workers: int = 2,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.bank = bank
        self.loader = loader
        self.on_ready = on_ready
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lorakit-adapter-load")
        self._lock = threading.Lock()
        self._parked: dict[str, list[GenerationRequest]] = {}
        self._loading: set[str] = set()  # adapters with a load under way (submitted, not ended)
        self.loads = 0  # loads started (one per adapter however many requests wait for it)

    @property
    def in_flight(self) -> int:
        """Adapters being loaded now (those whose waiting requests were all cancelled too)."""
        with self._lock:
            return len(self._loading)

    @property
    def parked(self) -> int:
        """Requests waiting for those loads, cancelled ones not counted."""
        with self._lock:
            return sum(not r.cancelled for waiting in self._parked.values() for r in waiting)

    def has_cancelled(self) -> bool:
        with self._lock:
            return any(r.cancelled for waiting in self._parked.values() for r in waiting)

    def take_cancelled(self) -> list[GenerationRequest]:
        """The cancelled requests among those waiting for a load, no longer waiting (the load
        goes on; the engine ends them at once)."""
        with self._lock:
            cancelled = [r for waiting in self._parked.values() for r in waiting if r.cancelled]
            for name, waiting in self._parked.items():
                self._parked[name] = [r for r in waiting if not r.cancelled]
        return cancelled

    def park(self, request: GenerationRequest) -> None:
        """Wait for ``request.adapter`` to be loaded (starting its load unless one is under way)."""
        name = request.adapter
        with self._lock:
            self._parked.setdefault(name, []).append(request)
            if name in self._loading:
                return
            self._loading.add(name)
            self.loads += 1
        self._pool.submit(self._load, name)

    def _load(self, name: str) -> None:
        """Load ``name`` into the bank and hand it to the requests waiting for it (loader
        thread); the load counts as under way until they have it."""
        error: BaseException | None = None
        try:
            self.bank.acquire(name, self.loader)  # held: nothing evicts it before handing over
        except BaseException as failure:  # handed to the requests: the engine reports it
            error = failure
        with self.bank.lock, self._lock:
            requests = self._parked.pop(name, [])
            self._loading.discard(name)
            for request in requests:
                if error is None:
                    request.slot = self.bank.acquire(name)  # each request holds it once
                else:
                    request.load_error = error
            if error is None:
                self.bank.release(name)  # this thread's hold
        if requests:
            self.on_ready(requests)
        release_idle_team()  # the copies made this thread a team: idle, it slows the engine's

    def drain(self) -> list[GenerationRequest]:
        """Stop: the requests still waiting for a load (their loads finish into nothing)."""
        with self._lock:
            requests = [r for waiting in self._parked.values() for r in waiting]
            self._parked.clear()
        self._pool.shutdown(wait=False)
        return requests
