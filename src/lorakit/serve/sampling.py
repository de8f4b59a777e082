"""Choosing the next token (greedy, temperature, min-p, top-k, top-p, as vLLM orders them) and
cutting text at stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "GREEDY_BELOW",
    "MAX_LOGPROBS",
    "SEED_RANGE",
    "InvalidSamplingParam",
    "SamplingParams",
    "StopTextTracker",
    "TokenLogprob",
    "filtered_probs",
    "greedy_tokens",
    "next_token",
    "stop_tokens_masked",
    "token_logprob",
]

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (see next_token)
MAX_LOGPROBS = 20  # most alternatives a request may ask for (OpenAI's top_logprobs, vLLM's)


class InvalidSamplingParam(ValueError):
    """A ``SamplingParams`` field out of range; ``field`` names it (OpenAI's name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI's names).

    ``temperature < GREEDY_BELOW`` (0 included) is greedy; otherwise tokens are drawn from
    p = softmax(logits / temperature) cut, in vLLM's order, to the tokens with
    ``p >= min_p * max(p)`` (0: off), then to the ``top_k`` most likely (0 or -1: off; ties at
    the k-th probability kept, as vLLM), then to the smallest set of most likely tokens whose
    renormalised probability reaches ``top_p``; with a generator seeded by ``seed`` (None: a
    random seed; else in ``SEED_RANGE``). Sampling ``stop_token_ids`` ends the request with
    finish reason "stop", the token left out of the output (as EOS). Out-of-range fields raise
    ``InvalidSamplingParam`` naming the field (the vocabulary's bound on ``stop_token_ids`` is
    checked where the vocabulary is known: ``Engine.submit``, ``prompts.prompt_ids``).

    vLLM's ``ignore_eos``: EOS does not end the request (it is an output token like any other;
    ``stop``, ``stop_token_ids`` and ``max_tokens`` still end it). ``min_tokens`` (0 to
    ``max_tokens``): until that many tokens were generated, EOS (unless ``ignore_eos``) and
    ``stop_token_ids`` cannot be sampled (their logits are -inf: ``stop_tokens_masked``) and
    a stop string ending within the first ``min_tokens`` tokens' text does not stop.
    ``include_stop_str_in_output``: the matched stop string is kept at the end of the text.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    """None: none; n: each token's log-probability and the n most likely alternatives'."""
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidSamplingParam(
                "max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidSamplingParam(
                "temperature", f"temperature must be in [0, 100], got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        self._check_filters()
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidSamplingParam(
                "seed", f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed}"
            )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidSamplingParam(
                "min_tokens",
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidSamplingParam(
                "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSamplingParam(
                "stop", f"stop strings must be non-empty strings, got {self.stop!r}"
            )

    def _check_filters(self) -> None:
        """``top_k`` an integer >= -1, ``min_p`` in [0, 1], ``stop_token_ids`` ids >= 0."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidSamplingParam(
                "top_k", f"top_k must be an integer >= -1 (-1 or 0: off), got {self.top_k!r}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidSamplingParam("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int)]
        if bad or any(t < 0 for t in self.stop_token_ids):
            raise InvalidSamplingParam(
                "stop_token_ids",
                f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}",
            )

    @property
    def filters(self) -> bool:
        """Whether min-p, top-k or top-p cut the distribution a sampled token is drawn from."""
        return self.min_p > 0.0 or self.top_k > 0 or self.top_p < 1.0


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits`` (vocab,) under ``params``:
    argmax(logits) when greedy, else a draw from p = softmax(logits / T) cut by min-p, top-k and
    top-p (``filtered_probs``).

    Temperatures below ``GREEDY_BELOW`` (1e-5) are greedy. Dividing by a tinier T overflows:
    1 / 2.8e-309 is inf in float64, the scaled logits become inf and p NaN, and the draw fails.
    Nothing is lost: at T = 1e-5 a runner-up 0.001 below the top logit is already
    exp(-100) ~ 4e-44 times as likely, so smaller temperatures choose the argmax all the same
    (bar exact ties). For T >= 1e-5 and finite float32 logits (|l| < 3.4e38), |l / T| < 3.4e43
    stays far inside float64.
    """
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.filters:
        probs = filtered_probs(probs, params)
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_tokens_masked(logits: torch.Tensor, token_ids: frozenset[int]) -> torch.Tensor:
    """A copy of ``logits`` (vocab,) with ``logits[t] = -inf`` for every t in ``token_ids``
    (vLLM's ``min_tokens``: those tokens cannot be sampled, greedy or not)."""
    masked = logits.clone()
    masked[list(token_ids)] = float("-inf")
    return masked


def filtered_probs(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``probs`` (vocab,) cut as vLLM's sampler cuts them, in its order (the most likely token
    always stays), renormalised before top-p:

        min-p:  p_i = 0 where p_i < min_p * max(p)
        top-k:  p_i = 0 where p_i < the k-th largest p (ties with it kept)
        top-p:  p_i = 0 where the renormalised mass of the tokens sorted before i >= top_p
    """
    probs = probs.clone()
    if params.min_p > 0.0:
        probs[probs < params.min_p * probs.max()] = 0.0
    if 0 < params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs[probs < kth] = 0.0
    if params.top_p < 1.0:
        probs = probs / probs.sum()
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each
        sorted_probs[before >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def greedy_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> list[int | None]:
    """The greedy rows' tokens of ``logits`` (B, vocab) in one argmax over the batch (the same
    ids as ``next_token`` row by row: argmax, first index of a tie); None for sampled rows."""
    greedy = [p.temperature < GREEDY_BELOW for p in params]
    if not any(greedy):
        return [None] * len(params)
    tokens = torch.argmax(logits, dim=-1).tolist()
    return [token if is_greedy else None for token, is_greedy in zip(tokens, greedy, strict=True)]


class TokenLogprob(NamedTuple):
    """A generated token's log-probability and the ``top`` alternatives' (``(id, logprob)``,
    most likely first), under the model's distribution (before temperature, min-p, top-k and
    top-p)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``TokenLogprob`` of ``token`` from ``logits`` (vocab,): ``log_softmax`` in float32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


class StopTextTracker:
    """Turns the growing decoded text into safe-to-send pieces, stopping at a stop string.

    Text that could still become a stop string (a suffix equal to a stop string's prefix), or an
    incomplete character (a trailing U+FFFD), is held back until it is decided. Only a stop
    string ending after the first ``search_from`` characters stops (``min_tokens``: set to the
    text's length while the first ``min_tokens`` tokens are generated); ``keep_stop``: the
    piece ends with the matched stop string (``include_stop_str_in_output``), else before it.
    """

    def __init__(self, stop: tuple[str, ...], keep_stop: bool = False) -> None:
        self.stop = stop
        self.keep_stop = keep_stop
        self.search_from = 0
        self.sent = 0
        self.stopped = False

    def update(self, text: str, final: bool = False) -> str:
        """The new piece to send given the whole text so far; sets ``stopped`` at a stop string."""
        match = self._first_stop(text)
        if match is not None:
            start, stop = match
            cut = start + len(stop) if self.keep_stop else start
            self.stopped = True
            piece, self.sent = text[self.sent : cut], max(self.sent, cut)
            return piece
        end = len(text) if final else self._safe_end(text)
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """``(start, stop string)`` of the earliest stop string in ``text`` that ends after
        ``search_from`` (the first of ``stop`` on a tie); None when none does."""
        found = []
        for stop in self.stop:
            start = text.find(stop, max(0, self.search_from - len(stop) + 1))
            if start >= 0:
                found.append((start, stop))
        return min(found, key=lambda match: match[0], default=None)

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:size]):
                    end = min(end, len(text[:end]) - size)
                    break
        return end
