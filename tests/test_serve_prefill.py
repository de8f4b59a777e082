"""Batched prefill (``lorakit.serve.prefill``): the requests admitted at one token boundary are
prefilled together, right-aligned and masked, each row with its own adapter, and generate what
each generates prefilled alone; a failing batched forward falls back to one prompt at a time."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaForCausalLM

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
    by_budget = prefill_groups([100] * 30, budget=1000, rows=32)
    assert by_budget == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    by_rows = prefill_groups([10] * 20)  # 8 prompts a group at most (PREFILL_ROWS)
    assert [len(group) for group in by_rows] == [8, 8, 4]


def _engine(specs=SPECS, config=None, **options):
    torch.manual_seed(0)
    reference = tiny_models.llama() if config is None else LlamaForCausalLM(config).eval()
    for index, spec in enumerate(specs):
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=f"a{index}")
    tiny_models.randomize_adapters(reference, std=0.3)
    torch.manual_seed(0)
    model = tiny_models.llama() if config is None else LlamaForCausalLM(config).eval()
    prepare_for_serving(model, sorted({t for spec in specs for t in _targets(spec)}))
    model.generation_config.eos_token_id = None
    bank = AdapterBank(model, max_rank=4, capacity=len(specs))
    for index in range(len(specs)):
        bank.load_from_model(f"a{index}", reference, f"a{index}")
    return Engine(model, bank, **options)


def _targets(spec) -> list[str]:
    targets = spec["target_modules"]
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return seven if targets == "all-linear" else targets


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


def test_the_admitted_requests_count_as_running_while_they_are_prefilled(monkeypatch):
    """``load()`` (what ``/health`` reports) counts the requests of a batched prefill: they
    were neither running nor waiting while their forward ran."""
    engine, seen = _engine(), []
    original = Engine._batched_forward

    def spy(self, requests):
        seen.append(sum(self.load))
        return original(self, requests)

    monkeypatch.setattr(Engine, "_batched_forward", spy)
    _run_together(engine)
    assert seen and seen[0] == len(REQUESTS)


def test_a_model_whose_output_layer_the_bank_routes_is_prefilled_alone(caplog):
    """An adapter on the output layer (only the last position's logits are computed, one row a
    prompt) makes the requests prefilled one prompt at a time, with no failed batched forward
    logged, and they generate what they generate alone. (A ``dynamic`` or ``longrope`` rotary
    embedding is rotated per row: ``tests/test_serve_row_rope.py``.)"""
    specs = [
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]),
        dict(r=2, lora_alpha=4, target_modules=["v_proj", "lm_head"]),
    ]
    engine = _engine(specs=specs)
    assert not engine._batched_prefill
    together = _run_together(engine)
    assert "a batched prefill failed" not in caplog.text
    alone = _engine(max_batch=1, specs=specs)
    with alone:
        for index, (prompt, adapter) in enumerate(REQUESTS):
            assert together[index][0] == _alone(alone, prompt, adapter)[0], index


def test_the_group_of_the_first_admitted_request_runs_first(monkeypatch):
    """Groups are formed by length but run in the order of their earliest request: the first
    request submitted (6 tokens) is not kept waiting behind the shorter prompts after it."""
    engine, order = _engine(), []
    original = Engine._batched_forward

    def spy(self, requests):
        order.append([r.prompt_ids for r in requests])
        return original(self, requests)

    monkeypatch.setattr(Engine, "_batched_forward", spy)
    prompts = [[9] * 6, [3] * 3, [4] * 3, [8] * 6]  # groups by length: (2nd, 3rd), (1st, 4th)
    done = threading.Semaphore(0)
    for prompt in prompts:
        engine.submit(
            prompt, "a0", SamplingParams(max_tokens=2), lambda e: e.finish_reason and done.release()
        )
    with engine:
        for _ in prompts:
            assert done.acquire(timeout=60)
    assert order == [[prompts[0], prompts[3]], [prompts[1], prompts[2]]]
