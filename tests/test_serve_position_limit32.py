"""``Engine.submit`` refuses a request that would run past a learned position table.

The engine accepted it; its decode step then indexed GPT-2's ``wpe`` past its rows, and the
``IndexError`` failed every request of that batch (an ordinary one after 3 of its 10 tokens).
``lorakit serve`` refuses it earlier (``prompts.prompt_ids``); the Engine API did not.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorakit.serve.engine import Engine
from lorakit.serve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def _run(engine: Engine, jobs: list[tuple[list[int], int]]) -> list[list]:
    """Each job's events (the engine started after all were submitted)."""
    done = threading.Semaphore(0)
    events: list[list] = [[] for _ in jobs]
    for (prompt, max_tokens), got in zip(jobs, events, strict=True):

        def on_event(event, got=got):
            got.append(event)
            if event.finish_reason:
                done.release()

        engine.submit(prompt, None, SamplingParams(max_tokens=max_tokens), on_event)
    with engine:
        for _ in jobs:
            assert done.acquire(timeout=60)
    return events


@pytest.mark.parametrize(("prompt", "max_tokens"), [(30, 8), (33, 1), (32, 2)])
def test_a_request_past_the_table_is_refused_at_submit(gpt2, prompt, max_tokens):
    engine = Engine(gpt2, None, max_batch=8, eos_token_ids=())
    with pytest.raises(ValueError, match=r"learned position table has 32: shorten the prompt"):
        engine.submit([7] * prompt, None, SamplingParams(max_tokens=max_tokens), print)


def test_requests_that_fit_run_to_their_length(gpt2):
    """A prompt of 32 tokens and one new token fits (its token is never fed back)."""
    engine = Engine(gpt2, None, max_batch=8, eos_token_ids=())
    ordinary, full = _run(engine, [([5] * 10, 10), ([7] * 32, 1)])
    assert [e.finish_reason for e in (ordinary[-1], full[-1])] == ["length", "length"]
    assert sum(len(e.token_ids) for e in ordinary) == 10
    assert sum(len(e.token_ids) for e in full) == 1
