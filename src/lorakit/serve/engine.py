"""The generation engine: many concurrent requests, each with its own adapter, one base model.

A background thread runs the loop; at every token boundary it admits waiting requests (those
admitted together are prefilled together, each row with its adapter, ``lorakit.serve.prefill``,
then join the running batch's KV cache, ``kv.BatchedCache``),
runs one batched decode step for all running requests with the batched multi-adapter op
(``batched.routed``, one slot per row; when every row has the same adapter, as one stream and
every prefill do, ``one_adapter.routed_one``, the same sum without grouping), samples each row
with its own settings and generator, streams the new text, and drops finished rows (continuous
batching).

A request whose adapter is not in the bank never stalls the loop: it waits aside while loader
threads read its adapter (``cold_loads.ColdLoads``), and the other requests go on.

Requests are submitted from any thread (``submit`` with a callback) or from asyncio (``stream``):
``lorakit.serve.submission``, which also bounds the waiting queue. The decode step is
``lorakit.serve.decode_step``; how requests end (their last event), ``lorakit.serve.endings``.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.positions import learned_position_limit
from lorakit.serve.admission import Admission
from lorakit.serve.bank import AdapterBank
from lorakit.serve.cold_loads import ColdLoads
from lorakit.serve.decode_step import DecodeStep
from lorakit.serve.endings import Endings
from lorakit.serve.kv import BatchedCache
from lorakit.serve.lazy_loads import Loader
from lorakit.serve.lean_decode import lean_decoder
from lorakit.serve.one_at_a_time import serving_plan
from lorakit.serve.openmp import release_idle_team
from lorakit.serve.prefill import Prefill
from lorakit.serve.requests import (
    INTERNAL,
    EngineStats,
    EngineStoppedError,
    Event,
    EventStream,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    model_eos_token_ids,
    vocabulary_size,
)
from lorakit.serve.routing import Routing
from lorakit.serve.row_rope import length_dependent_rotaries, per_row, recompute_length
from lorakit.serve.sampling import next_token, stop_tokens_masked, token_logprob
from lorakit.serve.submission import QueuePlace, Submission

__all__ = [
    "Engine",
    "EngineStoppedError",
    "Event",
    "EventStream",
    "QueueFullError",
    "QueuePlace",
    "RequestHandle",
]

log = logging.getLogger(__name__)


class Engine(Admission, Prefill, Submission, DecodeStep, Endings):
    """Continuous-batching generation over an ``AdapterBank``.

    ``model``: a causal LM prepared with ``prepare_for_serving`` and served by ``bank``
    (None: no bank; requests name no adapter and the model runs as it is, e.g. with its own
    active adapters: ``lorakit generate``);
    ``tokenizer``: turns generated ids into streamed text (optional: ids only);
    ``adapter_loader(name) -> (config, tensors)``: reads an adapter missing from the bank
    (``KeyError`` when unknown; None: only adapters already in the bank are served; any other
    exception ends only that request), called from ``load_workers`` threads of its own, never
    from the decode loop; ``max_batch``: running requests at most;
    ``max_waiting``: queued requests at most (None: no bound), beyond which ``submit`` raises
    ``QueueFullError``. ``stats`` (``EngineStats``) records how full the running batch got and
    how many requests were cancelled. ``lean_decode``: decode steps of a Llama-family model run
    ``lean_decode.LeanDecoder`` (the same function in fewer ops; with a bank, q/k/v and gate/up
    are each one product over their concatenated weights, of which the model's weights become
    views) instead of the model's own forward. ``max_loras``: distinct adapters in the running
    batch at most (vLLM's ``--max-loras``; None: no bound): a request for another adapter waits,
    in its place in the queue, until one of them leaves the batch, while requests behind it whose
    adapters are in the batch go ahead. A decode step reads every adapter of its batch: fewer
    distinct adapters is fewer bytes a step, but the batch may be smaller and the others wait
    (docs/serving.md: on a thousand-adapter zipf workload it cost throughput). A request that
    waits (for a bank slot, or for ``max_loras``) lets later requests go ahead only until
    ``max_batch`` of them were admitted; then nothing else is admitted until it runs.
    """

    def __init__(
        self,
        model: nn.Module,
        bank: AdapterBank | None,
        tokenizer=None,
        *,
        max_batch: int = 32,
        adapter_loader: Loader | None = None,
        eos_token_ids: Sequence[int] | None = None,
        max_waiting: int | None = None,
        load_workers: int = 2,
        lean_decode: bool = True,
        max_loras: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_loras is not None and max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 or None, got {max_loras}")
        self.model = model.eval()
        alone, self._solo = serving_plan(model)  # (``lorakit.serve.one_at_a_time``)
        if alone is not None and max_batch > 1:
            log.info("serving %s one request at a time: %s", type(model).__name__, alone)
            max_batch = 1  # the others wait in the queue, as with max_batch=1
        for rotary in length_dependent_rotaries(model):
            per_row(rotary)  # each row rotated as alone, also past the original context
        self._recompute_length = recompute_length(model)  # (``Prefill._prefill_again``)
        self._lean = lean_decoder(model, fuse_siblings=bank is not None) if lean_decode else None
        self.bank = bank
        accepts = inspect.signature(model.forward).parameters
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._takes_cache = "cache" in accepts
        self._forward_parameters = set(accepts)
        self._batched_prefill = self._allows_batched_prefill()  # (``lorakit.serve.prefill``)
        self.tokenizer = tokenizer
        self.vocab_size = vocabulary_size(model)
        self.position_limit = learned_position_limit(model)  # (``Submission.submit``)
        self.max_batch = max_batch
        self.max_loras = max_loras
        self.max_waiting = max_waiting
        self.adapter_loader = adapter_loader
        self.load_workers = load_workers
        self._cold: ColdLoads | None = None
        if eos_token_ids is None:
            eos_token_ids = model_eos_token_ids(model)
        self.eos_token_ids = set(eos_token_ids)
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._deferred: list[GenerationRequest] = []  # waiting, held aside by ``_admit``
        self._starving: dict[int, GenerationRequest] = {}  # by id: see ``_note_starving``
        self._admissions = 0  # requests admitted so far (``_note_blocked`` counts from it)
        self._reserved = 0  # queue places held by ``reserve()``, not yet taken or released
        self._running: list[GenerationRequest] = []
        self._ready: list[GenerationRequest] = []  # admitted, not yet prefilled (``_admit``)
        self._cache = BatchedCache(max_rows=max_batch)
        self._routing = Routing(bank)  # one-adapter route or the batched op, per forward
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = EngineStats()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        """Start the loop on its own thread. The calling thread's idle OpenMP team is released
        first (``openmp.release_idle_team``: with it, the loop's team runs decode steps up to
        1.9x slower), and the loop releases its own whenever it runs out of requests (so that
        another thread's torch work meanwhile is not slowed by it in turn)."""
        if self._thread is None:
            self._stopping = False
            release_idle_team()
            if self.adapter_loader is not None:
                self._cold = ColdLoads(
                    self.bank, self.adapter_loader, self._loaded, workers=self.load_workers
                )
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the loop; requests still queued or running end with ``cancelled``, and
        ``submit`` raises ``EngineStoppedError`` until the next ``start()``. Before ``start()``
        (no loop to end them) the queued requests end here, also with ``cancelled``: they once
        got no event at all (review 31)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._cancel_all()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts; running counts those being prefilled, waiting
        those parked on an adapter load and those ``_admit`` holds aside (``_deferred``)."""
        waiting = len(self._waiting) + len(self._deferred) + self._parked()
        return len(self._running) + len(self._ready), waiting

    def _parked(self) -> int:
        return 0 if self._cold is None else self._cold.parked

    @property
    def cold_loads(self) -> int:
        """Adapter loads the engine started (0 without an ``adapter_loader``)."""
        return 0 if self._cold is None else self._cold.loads

    def _loaded(self, requests: list[GenerationRequest]) -> None:
        """A loader thread is done with these requests' adapter: back to the head of the queue
        (cancelled, their slots released, when the loop has stopped meanwhile)."""
        with self._wake:
            if not self._stopping:
                self._waiting.extendleft(reversed(requests))
                self._wake.notify_all()
                return
        for request in requests:
            self._finish(request, "cancelled")

    # ----------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            if not self._waiting and not self._running:  # idle (a stale read is harmless)
                release_idle_team()  # its parked team would slow other threads' torch ops
            with self._wake:
                while not (self._stopping or self._waiting or self._running):
                    if self._cold is not None and self._cold.has_cancelled():
                        break  # a request waiting for a load was cancelled: end it now
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._admit()
                    if self._running:
                        self._decode_step()
                    else:
                        self._idle_while_deferred()
            except Exception as error:  # keep serving: fail the affected requests only
                log.exception("engine step failed")
                for request in [*self._running, *self._ready]:
                    message = f"{type(error).__name__}: {error}"
                    self._finish(request, "error", message, kind=INTERNAL)
                self._running, self._ready = [], []
                self._cache = BatchedCache(max_rows=self.max_batch)
        self._cancel_all()

    def _idle_while_deferred(self) -> None:
        """Nothing runs and the queue holds only requests waiting for a slot that a load under
        way holds: sleep until something changes (or briefly) instead of spinning."""
        with self._wake:
            if self._waiting and not self._stopping:
                self._wake.wait(timeout=0.01)

    # ----------------------------------------------------------------- tokens out
    def _accept(
        self, request: GenerationRequest, logits: torch.Tensor, token: int | None = None
    ) -> None:
        """Take ``token`` (None: sample it from ``logits`` (vocab,) with the request's settings;
        sampled again without them when ``token`` is one the request may not take yet:
        ``GenerationRequest.masked_now``). Log-probabilities are of the unmasked ``logits``."""
        masked = request.masked_now(self.eos_token_ids)
        if token is None or token in masked:
            allowed = stop_tokens_masked(logits, masked) if masked else logits
            token = next_token(allowed.float(), request.params, request.generator)
        top = request.params.logprobs
        logprob = None if top is None else token_logprob(logits, token, top)
        piece = request.take(token, self.eos_token_ids, self.tokenizer, logprob)
        if piece is None:
            return
        final, text, ids, logprobs = piece
        if final is None:
            request.deliver(Event(text, ids, logprobs=logprobs))
        else:
            self._finish(request, final, text=text, ids=ids, logprobs=logprobs)
