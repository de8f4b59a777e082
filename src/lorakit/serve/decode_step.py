"""The engine's decode step (``Engine`` inherits it): one token for every running request.

At each token boundary with requests running, ``_decode_step`` takes aside the rows a longrope
model must prefill again (``row_rope``), steps the others (``_step_running``), then prefills
those again (``Prefill._prefill_again``). ``_step_running`` runs one batched forward of the
running requests' last tokens: a model served one request at a time steps its own state
(``one_at_a_time``), a Llama-family model with a preallocated cache runs the lean decoder
(``lean_decode.LeanDecoder``), any other the model's forward over the batched cache
(``kv.BatchedCache``); each row routed to its adapter (``routing.Routing``). Each row then
takes its token (the batched argmax for greedy rows, ``sampling.greedy_tokens``; else
sampled by ``_accept``), and the finished rows leave the batch and its cache. A row whose
sampling or text fails ends alone, with an error event. This is the hot path, once per token:
keep it free of extra calls and lookups.

The engine's state this reads and changes: ``model``, ``_solo``, ``_lean``, ``_cache``,
``_routing``, ``_running``, ``_ready``, ``stats``, and its ``_accept``, ``_finish``,
``_take_rows_to_run_again`` and ``_prefill_again``.
"""

from __future__ import annotations

import logging

import torch

from lorakit.serve.requests import INTERNAL
from lorakit.serve.sampling import greedy_tokens

__all__ = ["DecodeStep"]

log = logging.getLogger("lorakit.serve.engine")


class DecodeStep:
    """The decode half of ``lorakit.serve.engine.Engine`` (see the module docstring)."""

    def _decode_step(self) -> None:
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        again = self._take_rows_to_run_again()  # (Phi-3-like longrope models: ``row_rope``)
        self._ready.extend(again)  # counted as running meanwhile; failed if the step fails
        if self._running:
            self._step_running()
        for request in again:
            self._prefill_again(request)
            self._ready.remove(request)

    def _step_running(self) -> None:
        """One batched decode step of the running requests: a token each."""
        last = torch.tensor([[r.generated[-1]] for r in self._running])
        solo = self._solo  # one request with its own state (``one_at_a_time``): no cache here
        attention_mask, position_ids = (None, None) if solo else self._cache.step_inputs()
        with self._routing([r.slot for r in self._running], 1):
            if solo is not None:
                logits = solo.step(last)
            elif self._lean is not None and self._cache.preallocated:
                logits = self._lean.step(last, attention_mask, position_ids, self._cache.cache)
            else:
                output = self.model(
                    input_ids=last,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=self._cache.cache,
                    use_cache=True,
                )
                self._cache.cache = output.cache
                logits = output.logits[:, -1]
        self._cache.advance()
        greedy = greedy_tokens(logits, [r.params for r in self._running])
        for row, request in enumerate(self._running):
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                self._accept(request, logits[row], greedy[row])
            except Exception as error:  # this row's sampling or text: end this request alone
                log.exception("request %d failed in a decode step", request.id)
                self._finish(request, "error", f"{type(error).__name__}: {error}", kind=INTERNAL)
        keep = [row for row, request in enumerate(self._running) if not request.done]
        if len(keep) < len(self._running):
            self._running = [self._running[row] for row in keep]
            self._cache.keep(keep)
            if solo is not None and not self._running:
                solo.clear()
