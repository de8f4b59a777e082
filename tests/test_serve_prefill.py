"""Batched prefill (``lorakit.serve.prefill``): the requests admitted at one token boundary are
prefilled together, right-aligned and masked, each row with its own adapter, and generate what
each generates prefilled alone; a failing batched forward falls back to one prompt at a time."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.prefill import PADDING_SHARE, prefill_groups
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = [
    dict(r=4, lora_alpha=8, target_modules="all-linear"),
    dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
]
# (prompt, adapter): lengths 5-9 (one group) and 24 (its own), mixed adapters and the base
REQUESTS = [
    ([3, 17, 9, 44, 2], "a0"),
    ([8, 1, 1, 90, 33, 12, 7], "a1"),
    ([5, 6, 7, 8, 9, 10, 11, 12, 13], None),
    ([60, 2, 19, 4, 77, 31], "a0"),
    (list(range(20, 44)), "a1"),
    ([100, 101, 102, 103, 104, 105, 106, 107], "a1"),
]


def test_groups_keep_padding_and_size_bounded():
    lengths = [5, 7, 9, 6, 24, 8]
    groups = prefill_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        longest, real = max(lengths[i] for i in group), sum(lengths[i] for i in group)
        assert len(group) * longest - real <= PADDING_SHARE * real or len(group) == 1
    assert [4] in groups  # the long prompt would pad the short ones by more than a quarter
    assert prefill_groups([100] * 30, budget=1000) == [
        list(range(10)),
        list(range(10, 20)),
        list(range(20, 30)),
    ]


def _engine(**options):
    reference = tiny_models.llama()
    for index, spec in enumerate(SPECS):
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=f"a{index}")
    tiny_models.randomize_adapters(reference, std=0.3)
    model = tiny_models.llama()
    prepare_for_serving(model)
    model.generation_config.eos_token_id = None
    bank = AdapterBank(model, max_rank=4, capacity=len(SPECS))
    for index in range(len(SPECS)):
        bank.load_from_model(f"a{index}", reference, f"a{index}")
    return Engine(model, bank, **options)


def _run_together(engine) -> dict[int, tuple[list[int], list[float]]]:
    """Submit every request before the engine starts (all admitted at its first boundary)."""
    results, done = {}, threading.Semaphore(0)
    for index, (prompt, adapter) in enumerate(REQUESTS):
        events = []

        def collect(event, index=index, events=events):
            events.append(event)
            if event.finish_reason is not None:
                ids = [i for e in events for i in e.token_ids]
                logprobs = [p.logprob for e in events for p in e.logprobs]
                results[index] = (ids, logprobs, event.finish_reason)
                done.release()

        engine.submit(prompt, adapter, SamplingParams(max_tokens=6, logprobs=0), collect)
    with engine:
        for _ in REQUESTS:
            assert done.acquire(timeout=60)
    return results


def _alone(engine, prompt, adapter) -> tuple[list[int], list[float]]:
    events, done = [], threading.Event()

    def collect(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    engine.submit(prompt, adapter, SamplingParams(max_tokens=6, logprobs=0), collect)
    assert done.wait(60)
    return [i for e in events for i in e.token_ids], [p.logprob for e in events for p in e.logprobs]


def test_requests_prefilled_together_generate_what_each_generates_alone(monkeypatch):
    together = _engine()
    calls = []
    original = type(together)._batched_forward

    def spy(self, requests):
        calls.append(len(requests))
        return original(self, requests)

    monkeypatch.setattr(type(together), "_batched_forward", spy)
    results = _run_together(together)
    assert calls and max(calls) >= 4  # the five short prompts ran as one forward (or two)
    alone = _engine(max_batch=1)  # one request at a time: every prefill alone
    with alone:
        for index, (prompt, adapter) in enumerate(REQUESTS):
            ids, logprobs, reason = results[index]
            expected_ids, expected_logprobs = _alone(alone, prompt, adapter)
            assert reason == "length" and ids == expected_ids, index
            assert len(logprobs) == len(expected_logprobs) == 6
            torch.testing.assert_close(
                torch.tensor(logprobs), torch.tensor(expected_logprobs), atol=1e-5, rtol=0
            )


def test_a_failing_batched_forward_falls_back_to_one_prompt_at_a_time(monkeypatch, caplog):
    expected = _run_together(_engine())

    def broken(self, requests):
        raise RuntimeError("no memory for this batch")

    monkeypatch.setattr(Engine, "_batched_forward", broken)
    results = _run_together(_engine())
    assert "a batched prefill failed" in caplog.text
    for index in range(len(REQUESTS)):
        assert results[index][0] == expected[index][0] and results[index][2] == "length"
