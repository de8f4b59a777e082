"""What the engine hands out and keeps per request: ``Event`` (a streamed piece), the request's
state, ``RequestHandle`` (cancel), and the kinds of failure a request can end with."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.serve.sampling import SamplingParams, StopTextTracker, TokenLogprob
from lorakit.serve.token_pieces import PromptTail, prompt_tail, text_after

__all__ = [
    "ADAPTER_NOT_FOUND",
    "INTERNAL",
    "INVALID_ADAPTER",
    "NO_ADAPTER_SLOT",
    "EngineStats",
    "EngineStoppedError",
    "Event",
    "EventStream",
    "GenerationRequest",
    "QueueFullError",
    "RequestHandle",
    "check_token_ids",
    "failure_kind",
    "model_eos_token_ids",
    "vocabulary_size",
]

log = logging.getLogger(__name__)
_ids = itertools.count()

# Event.error_kind of a request that ended with finish_reason "error":
ADAPTER_NOT_FOUND = "adapter_not_found"  # unknown, or unloaded after the request was queued
INVALID_ADAPTER = "invalid_adapter"  # its files could not be read or do not fit the model
NO_ADAPTER_SLOT = "no_adapter_slot"  # no slot or too few pages, nothing will free some (HTTP 503)
INTERNAL = "internal"  # anything else (a bug, or the model failed)


@dataclass
class EngineStats:
    """Evidence of continuous batching: ``max_running``, the most requests one decode step
    served; ``joined_running``, requests admitted while others were mid-generation; and
    ``cancelled``, requests ended by ``RequestHandle.cancel`` (their client left) or by
    ``Engine.stop``."""

    max_running: int = 0
    joined_running: int = 0
    cancelled: int = 0


class EngineStoppedError(RuntimeError):
    """``submit`` after ``Engine.stop()``: no thread would ever serve the request."""


class QueueFullError(RuntimeError):
    """``submit`` while ``Engine.max_waiting`` requests are already queued: retry later."""


def failure_kind(error: BaseException) -> str:
    """The ``error_kind`` for an exception raised while admitting or loading a request."""
    if isinstance(error, KeyError):
        return ADAPTER_NOT_FOUND
    if isinstance(error, (ValueError, UserError)):  # AdapterFileError, base mismatch, shapes
        return INVALID_ADAPTER
    return INTERNAL


@dataclass(frozen=True)
class Event:
    """A streamed piece of one request: new ``text`` and ``token_ids`` since the last event.

    The last event has ``finish_reason`` ("stop", "length", "cancelled" or "error" with
    ``error``, a message, and ``error_kind``, one of this module's constants) and the token
    counts.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_kind: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them


@dataclass
class GenerationRequest:
    """One request's state inside the engine (its slot, generated ids, generator, stop text)."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    cancelled: bool = False
    done: bool = False
    load_error: BaseException | None = None  # its adapter's load failed (``cold_loads``)
    blocked_since: int | None = None  # admissions when it first had to wait (``Engine``)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is None:  # a fresh seed from the OS: torch's global RNG untouched
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)
        self.stop_text = StopTextTracker(self.params.stop, self.params.include_stop_str_in_output)
        self.stop_token_ids = frozenset(self.params.stop_token_ids)
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_tail: PromptTail | None = None  # set at the first decode (``_new_text``)

    def masked_now(self, eos_token_ids: set[int]) -> frozenset[int]:
        """The token ids the next token may not be (vLLM's ``min_tokens``): while fewer than
        ``params.min_tokens`` tokens were generated, EOS (also with ``params.ignore_eos``, as
        vLLM: that only decides whether EOS ends the request) and ``stop_token_ids``; else
        none."""
        if len(self.generated) >= self.params.min_tokens:
            return frozenset()
        return frozenset(eos_token_ids) | self.stop_token_ids

    def take(
        self, token: int, eos_token_ids: set[int], tokenizer, logprob: TokenLogprob | None = None
    ) -> tuple[str | None, str, tuple[int, ...], tuple[TokenLogprob, ...]] | None:
        """Record a sampled ``token`` (with its ``logprob`` when asked for): ``(finish reason or
        None, new text, new ids, their logprobs)`` to send, or None when nothing can be sent yet
        (text that may still become a stop string, or an incomplete character, is held back).
        EOS (unless ``params.ignore_eos``: then an output token), or one of the request's
        ``stop_token_ids``, ends with "stop" and is not among the output ids; with
        ``params.include_stop_str_in_output`` a stop token other than EOS is kept as the last
        output token (its id, text, log-probability and count, as vLLM keeps it). A stop string
        ending in the first ``params.min_tokens`` tokens' text does not stop
        (``StopTextTracker.search_from``).
        """
        final = None
        ends = self.stop_token_ids if self.params.ignore_eos else eos_token_ids
        if token in ends or token in self.stop_token_ids:
            final = "stop"
            if self.params.include_stop_str_in_output and token not in eos_token_ids:
                self._keep(token, logprob)
        else:
            self._keep(token, logprob)
            if len(self.generated) >= self.params.max_tokens:
                final = "length"
        text = ""
        if tokenizer is not None:
            text = self._new_text(tokenizer, final=final is not None)
            if self.stop_text.stopped:
                final = "stop"
        if final is None and not text and not self.pending_ids:
            return None
        ids, self.pending_ids = tuple(self.pending_ids), []
        logprobs, self.pending_logprobs = tuple(self.pending_logprobs), []
        return final, text, ids, logprobs

    def _keep(self, token: int, logprob: TokenLogprob | None) -> None:
        """``token`` is an output token: generated, to be sent with its log-probability."""
        self.generated.append(token)
        self.pending_ids.append(token)
        if logprob is not None:
            self.pending_logprobs.append(logprob)

    def _new_text(self, tokenizer, final: bool) -> str:
        """The output text not sent yet: the ``generated`` ids' text after the prompt (special
        tokens skipped; decoded after the prompt's last tokens, ``token_pieces.text_after``, so
        a SentencePiece first token keeps its leading space), cut at a stop string."""
        if self.prompt_tail is None:
            self.prompt_tail = prompt_tail(tokenizer, self.prompt_ids)
        decoded = text_after(tokenizer, self.prompt_tail, self.generated)
        if len(self.generated) <= self.params.min_tokens:
            self.stop_text.search_from = len(decoded)
        return self.stop_text.update(decoded, final=final)

    def deliver(self, event: Event) -> None:
        """Hand ``event`` to the consumer; a failing callback cancels the request, nothing else."""
        try:
            self.on_event(event)
        except Exception:  # a consumer's callback must not stop the engine
            log.exception("on_event callback failed")
            self.cancelled = True


class RequestHandle:
    """What ``Engine.submit`` returns: ``cancel()`` stops the request at the next token boundary
    (a queued one, or one waiting for its adapter's load, leaves the queue; a running one leaves
    the batch, freeing its KV rows and its adapter slot) and ends it with finish reason
    "cancelled". ``wake``: tells the engine's loop to look (it may be idle)."""

    def __init__(self, request: GenerationRequest, wake: Callable[[], None] = lambda: None):
        self._request = request
        self._wake = wake

    def cancel(self) -> None:
        self._request.cancelled = True
        self._wake()


class EventStream:
    """Async iterator over one submitted request's events, ending after the final one.

    Built on the event loop that consumes it: the engine thread hands events over with
    ``call_soon_threadsafe``. ``cancel()`` stops the request (when its consumer leaves).
    """

    def __init__(self, submit: Callable[[Callable[[Event], None]], RequestHandle]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._finished = False
        self._handle = submit(
            lambda event: loop.call_soon_threadsafe(self._queue.put_nowait, event)
        )

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        self._finished = event.finish_reason is not None
        return event

    def cancel(self) -> None:
        self._handle.cancel()


def vocabulary_size(model: nn.Module) -> int | None:
    """The rows of ``model``'s input embedding (the ids a prompt may hold: ``[0, rows)``);
    None for a model without ``get_input_embeddings`` (no bound checked)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    return getattr(embeddings, "num_embeddings", None)


def model_eos_token_ids(model: nn.Module) -> list[int]:
    """The model's ``generation_config.eos_token_id`` as a list (none, one id or several): the
    ids transformers' ``generate`` stops at."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def check_token_ids(ids: Sequence[int], what: str, vocab_size: int | None) -> None:
    """``ValueError`` naming the first id of ``ids`` outside ``[0, vocab_size)`` and its
    position (``what`` names the list in the message)."""
    if vocab_size is None:
        return
    for position, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"{what} id {token} at position {position} is outside the model's vocabulary "
                f"[0, {vocab_size}); give ids in that range."
            )
