"""How the engine prefills the requests it admits at one token boundary (``Engine`` inherits it).

A prompt run alone is a full pass over the base's weights for a few tokens: on SmolLM2-135M at
one thread a 20-token prompt takes 87 ms alone and 49 ms a prompt when 8 run in one forward
(docs/serving.md). So the requests admitted together are prefilled together where the model
allows it (``batched``: every layer attention, and the forward takes ``attention_mask`` and
``position_ids``, and whose output layer the bank does not route,
``_allows_batched_prefill``): in groups of similar prompt lengths (``prefill_groups``), each group one
forward of its prompts right-aligned in a (G, T) batch, left padding masked out::

    ids[i, T - L_i:] = prompt_i      mask[i, T - L_i:] = 1      positions[i, T - L_i:] = 0 .. L_i - 1

each row routed to its own adapter (pad tokens too: their outputs are dropped). Each request
then takes its first token from its row's last logits and joins the running batch with the last
L_i columns of its row of the cache (``kv.BatchedCache.add``; the padding columns are never
copied). A request alone, or a model that does not allow it, is prefilled alone, as is every
request of a group whose forward fails (the error is logged; nothing was sampled yet).

The engine's state this reads and changes: ``model``, ``bank``, ``_routing``, ``_cache``,
``_running``, ``_ready`` (the admitted requests not yet joined: ``load`` counts them), ``_starving``, ``_takes_cache``, ``_last_logits``, ``stats``, and its ``_accept`` and
``_finish``.
"""

from __future__ import annotations

import copy
import logging

import torch

from lorakit.serve.kv import full_attention_cache
from lorakit.serve.requests import INTERNAL, GenerationRequest

__all__ = ["PREFILL_ROWS", "PREFILL_TOKENS", "Prefill", "prefill_groups"]

log = logging.getLogger("lorakit.serve.engine")

PREFILL_TOKENS = 1024  # padded tokens of one batched prefill at most
PREFILL_ROWS = 8  # prompts of one batched prefill at most (the gain per prompt is about all
# there at 8: 49 ms a 20-token prompt, 52 at 16; more rows only delay the group's first tokens)
PADDING_SHARE = 0.25  # a group's padding at most this share of its real tokens


def prefill_groups(
    lengths: list[int], budget: int = PREFILL_TOKENS, rows: int = PREFILL_ROWS
) -> list[list[int]]:
    """Indices of ``lengths`` (prompt tokens) grouped for batched prefills: by increasing
    length, a prompt joins the group before it while the group has fewer than ``rows``
    prompts, its padded size ``G x T`` (T its longest prompt) stays within ``budget`` and its
    padding within ``PADDING_SHARE`` of its real tokens; otherwise it starts a new group.
    Every index appears once."""
    groups: list[list[int]] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length = lengths[index]
        if groups and len(groups[-1]) < rows:
            padded = (len(groups[-1]) + 1) * length
            if padded <= budget and padded - (real + length) <= PADDING_SHARE * (real + length):
                groups[-1].append(index)
                real += length
                continue
        groups.append([index])
        real = length
    return groups


class Prefill:
    """The prefill half of ``lorakit.serve.engine.Engine`` (see the module docstring)."""

    def _allows_batched_prefill(self) -> bool:
        """Every layer attention (``kv.full_attention_cache``), a forward that takes a cache,
        ``attention_mask`` and ``position_ids``, and an output layer the bank does not route
        (only the last position's logits are computed, one row a prompt, where the routing
        gives one slot a token). A ``dynamic`` or ``longrope`` rotary embedding is rotated per
        row (``row_rope``, done by the engine), so its rows do not interact either."""
        accepts = self._forward_parameters
        output = getattr(self.model, "get_output_embeddings", lambda: None)()
        return (
            self._takes_cache
            and {"attention_mask", "position_ids"} <= accepts
            and full_attention_cache(getattr(self.model, "config", None)) is not None
            and not (self.bank is not None and output is not None and self.bank.stack_for(output))
        )

    def _prefill_all(self, requests: list[GenerationRequest]) -> None:
        """Prefill ``requests`` (admitted at this token boundary, in their order): in groups where
        the model allows it, the group holding the earliest request first, else each alone. An
        error ends only the request it belongs to."""
        if len(requests) > 1 and self._batched_prefill:
            groups = prefill_groups([len(r.prompt_ids) for r in requests])
            groups.sort(key=min)  # the group of the earliest admitted request first
        else:
            groups = [[index] for index in range(len(requests))]
        for group in groups:
            members = [requests[index] for index in group]
            self._prefill_group(members)
            for request in members:  # (counted by ``load`` as running until they joined)
                self._ready.remove(request)

    def _prefill_group(self, members: list[GenerationRequest]) -> None:
        if len(members) > 1:
            try:
                output = self._batched_forward(members)
            except Exception:
                log.exception("a batched prefill failed; its requests are prefilled alone")
            else:
                self._join_rows(members, output)
                return
        for request in members:
            self._prefill_alone(request)

    def _prefill_alone(self, request: GenerationRequest) -> None:
        try:
            self._prefill(request)
        except Exception as error:
            log.exception("prefill failed")
            self._finish(request, "error", f"{type(error).__name__}: {error}", kind=INTERNAL)

    def _prefill(self, request: GenerationRequest, *, again: bool = False) -> None:
        """Run the prompt alone with its adapter; sample the first token; join the batch
        (``again``: the prompt and the generated tokens, the next token, rejoin: see
        ``_prefill_again``). Only the last position's logits are computed when the model allows
        it (the lm_head over a 64-token prompt of SmolLM2 is a fifth of the prefill)."""
        ids = request.prompt_ids + request.generated if again else request.prompt_ids
        if self._solo is not None:  # (``lorakit.serve.one_at_a_time``: no batched cache)
            with self._routing([request.slot], len(ids)):
                logits = self._solo.prefill(ids)
            self._join(request, logits, None, len(ids), rejoin=again)
            return
        with self._routing([request.slot], len(ids)):
            output = self.model(
                input_ids=torch.tensor([ids]), use_cache=True, **self._prefill_options()
            )
        self._join(request, output.logits[0, -1], output.cache, len(ids), rejoin=again)

    def _batched_forward(self, requests: list[GenerationRequest]):
        """One forward of the requests' prompts right-aligned in a (G, T) batch (the module
        docstring); the model's output (last logits (G, 1, vocab), the cache of all G rows)."""
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        positions = torch.zeros(len(requests), width, dtype=torch.long)
        for row, (request, length) in enumerate(zip(requests, lengths, strict=True)):
            ids[row, width - length :] = torch.tensor(request.prompt_ids)
            mask[row, width - length :] = 1
            positions[row, width - length :] = torch.arange(length)
        with self._routing([r.slot for r in requests], width):
            return self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **self._prefill_options(),
            )

    def _join_rows(self, requests: list[GenerationRequest], output) -> None:
        """Each request of a batched forward takes its row: its first token, and the last
        ``L_i`` columns of its row of the cache (a one-row cache of views, as a prefill alone
        gives; ``BatchedCache.add`` copies them). A failure ends only that request."""
        states = [(layer.keys, layer.values) for layer in output.cache.layers]
        for row, request in enumerate(requests):
            length = len(request.prompt_ids)
            try:
                row_cache = copy.copy(output.cache)
                row_cache.layers = []
                for layer, (keys, values) in zip(output.cache.layers, states, strict=True):
                    own = copy.copy(layer)
                    own.keys = keys[row : row + 1, :, keys.shape[2] - length :]
                    own.values = values[row : row + 1, :, values.shape[2] - length :]
                    row_cache.layers.append(own)
                self._join(request, output.logits[row, -1], row_cache, length)
            except Exception as error:
                log.exception("joining request %d after a batched prefill failed", request.id)
                message = f"{type(error).__name__}: {error}"
                self._finish(request, "error", message, kind=INTERNAL)

    def _join(
        self,
        request: GenerationRequest,
        logits: torch.Tensor,
        cache,
        length: int,
        *,
        rejoin: bool = False,
    ) -> None:
        """Sample the request's first token (``rejoin``: its next one) from ``logits`` (vocab,);
        unless that ends it, add its one-row ``cache`` of ``length`` tokens to the batch's and
        let it run."""
        self._accept(request, logits)
        if request.done:
            return
        if cache is not None:  # (None: ``one_at_a_time.SoloDecoder`` keeps the state)
            self._cache.add(cache, length)
        self.stats.joined_running += bool(self._running) and not rejoin
        self._running.append(request)
        self._starving.pop(request.id, None)

    def _take_rows_to_run_again(self) -> list[GenerationRequest]:
        """Take out of the running batch the requests that are to be prefilled again, whole,
        at this step: a ``longrope`` model's sequences whose prompt was within the original
        context and whose next position is the first past it (``row_rope.recompute_length``;
        their cache was rotated with the short factors, the long ones apply now)."""
        length = self._recompute_length
        if length is None:
            return []
        again = {
            row
            for row, r in enumerate(self._running)
            if len(r.prompt_ids) < length == len(r.prompt_ids) + len(r.generated)
        }
        if not again:
            return []
        keep = [row for row in range(len(self._running)) if row not in again]
        taken = [self._running[row] for row in sorted(again)]
        self._running = [self._running[row] for row in keep]
        self._cache.keep(keep)
        return taken

    def _prefill_again(self, request: GenerationRequest) -> None:
        """Run the request's whole sequence (prompt and generated tokens) alone with its
        adapter, as its decode step: the next token is sampled from its last logits and the
        request rejoins the batch with the new cache. An error ends only this request."""
        if request.cancelled:
            self._finish(request, "cancelled")
            return
        try:
            self._prefill(request, again=True)
        except Exception as error:
            log.exception("prefilling request %d again failed", request.id)
            self._finish(request, "error", f"{type(error).__name__}: {error}", kind=INTERNAL)

    def _prefill_options(self) -> dict:
        """Only the last position's logits, and a fresh cache that keeps every position
        (``kv.full_attention_cache``), where the model takes them."""
        options = dict(self._last_logits)
        if self._takes_cache:
            options["cache"] = full_attention_cache(getattr(self.model, "config", None))
        return options
