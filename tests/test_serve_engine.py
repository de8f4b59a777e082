"""The generation engine: continuous batching over mixed adapters, checked against each request
generated alone by transformers' ``generate`` on the model with that adapter merged."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.sampling import SamplingParams, StopTextTracker, greedy_tokens, next_token
from tests import tiny_models
from tests.tiny_models import adapter_tensors

SPECS = [
    dict(r=4, lora_alpha=8, target_modules="all-linear"),
    dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=4, target_modules=["o_proj", "up_proj", "k_proj"]),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LetterTokenizer:
    """ids -> letters, enough to exercise streamed text and stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def served():
    reference = tiny_models.llama()
    for index, spec in enumerate(SPECS):
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=f"a{index}")
    tiny_models.randomize_adapters(reference, std=0.3)
    model = tiny_models.llama()
    prepare_for_serving(model)
    bank = AdapterBank(model, max_rank=8, capacity=len(SPECS))
    for index in range(len(SPECS)):
        bank.load_from_model(f"a{index}", reference, f"a{index}")
    model.generation_config.eos_token_id = None  # compare full lengths
    return reference, model, bank


def alone_merged(reference, prompt, adapter, max_tokens):
    """Greedy tokens from transformers' generate with the adapter merged (None: base)."""
    with torch.no_grad():
        if adapter is None:
            with lorakit.disabled(reference):
                out = reference.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=None,
                )
        else:
            lorakit.merge(reference, [adapter])
            try:
                with lorakit.use_adapters(reference, [adapter]):
                    out = reference.generate(
                        torch.tensor([prompt]),
                        max_new_tokens=max_tokens,
                        do_sample=False,
                        eos_token_id=None,
                    )
            finally:
                lorakit.unmerge(reference)
    return out[0, len(prompt) :].tolist()


def requests(count=7):
    generator = torch.Generator().manual_seed(5)
    adapters = ["a0", "a1", "a2", None]
    out = []
    for index in range(count):
        length = int(torch.randint(1, 9, (1,), generator=generator))
        prompt = torch.randint(0, 128, (length,), generator=generator).tolist()
        out.append(
            (prompt, adapters[index % 4], 3 + index % 5)
        )  # different lengths: rows leave early
    return out


def test_greedy_in_a_mixed_continuous_batch_equals_alone_merged(served):
    reference, model, bank = served
    engine = Engine(model, bank, max_batch=3)  # fewer slots than requests: requests join later
    results, finished = {}, threading.Semaphore(0)

    def collector(events):
        def on_event(event):
            events.append(event)
            if event.finish_reason is not None:
                finished.release()

        return on_event

    for index, (prompt, adapter, max_tokens) in enumerate(requests()):
        events = results.setdefault(index, [])
        engine.submit(prompt, adapter, SamplingParams(max_tokens=max_tokens), collector(events))
    with engine:  # all 7 queued before the loop starts: the batching below is deterministic
        for _ in results:
            assert finished.acquire(timeout=60)
    # max_tokens 3, 4, 5, 6, 7, 3, 4 and 3 rows: requests 0-2 run together, and each later one
    # joins as an earlier one ends, while the other two are mid-generation (6 joins in all)
    assert (engine.stats.max_running, engine.stats.joined_running) == (3, 6)
    distinct_outputs = set()
    for index, (prompt, adapter, max_tokens) in enumerate(requests()):
        got = [i for e in results[index] for i in e.token_ids]
        assert results[index][-1].finish_reason == "length"
        assert got == alone_merged(reference, prompt, adapter, max_tokens), (index, adapter)
        distinct_outputs.add(tuple(got))
    assert len(distinct_outputs) > 4  # the adapters change the outputs: the test can fail


def test_kv_buffers_stay_within_max_batch_rows_and_go_back_when_the_batch_drains(
    served, monkeypatch
):
    """The KV buffers' row capacity grew by half again past max_batch (6 rows for 5) and an
    idle engine kept the buffers of its largest burst for good. Now: never more rows than
    max_batch, no buffers once the batch drains, fresh small ones for the next request, and
    the same tokens as each request alone."""
    from lorakit.serve import kv

    reference, model, bank = served
    shapes = []
    reserve = kv.BatchedCache._reserve

    def recording_reserve(self, *args, **kwargs):
        reserve(self, *args, **kwargs)
        shapes.append(tuple(self.cache.layers[0].key_buffer.shape))

    monkeypatch.setattr(kv.BatchedCache, "_reserve", recording_reserve)
    engine = Engine(model, bank, max_batch=5)
    work = requests(12)
    results, finished = {}, threading.Semaphore(0)
    for index, (prompt, adapter, max_tokens) in enumerate(work):

        def on_event(event, index=index):
            results.setdefault(index, []).append(event)
            if event.finish_reason is not None:
                finished.release()

        engine.submit(prompt, adapter, SamplingParams(max_tokens=max_tokens), on_event)

    def drained() -> bool:  # the last request's event comes before its row leaves the cache
        deadline = time.monotonic() + 10
        while engine._cache.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        return engine._cache.rows == 0

    with engine:  # all 12 queued before the loop starts: 5 rows run at once
        for _ in work:
            assert finished.acquire(timeout=60)
        assert drained()
        assert engine.stats.max_running == 5
        assert max(shape[0] for shape in shapes) == 5  # (was 6)
        assert engine._cache.cache is None  # the buffers went back (were kept for good)
        shapes.clear()
        ids, _, last = engine.generate([3, 4, 5], "a1", SamplingParams(max_tokens=4))
        assert drained() and engine._cache.cache is None
    assert last.finish_reason == "length"
    assert ids == alone_merged(reference, [3, 4, 5], "a1", 4)
    assert shapes and {shape[0] for shape in shapes} == {1}  # allocated for its one row
    for index, (prompt, adapter, max_tokens) in enumerate(work):
        got = [i for e in results[index] for i in e.token_ids]
        assert results[index][-1].finish_reason == "length"
        assert got == alone_merged(reference, prompt, adapter, max_tokens), (index, adapter)


def test_max_loras_bounds_the_adapters_of_a_step_and_lets_later_requests_pass(served):
    reference, model, bank = served
    engine = Engine(model, bank, max_batch=4, max_loras=1)
    step_adapters, finished, results = [], threading.Semaphore(0), {}
    decode_step = engine._decode_step

    def recording_step():
        step_adapters.append({r.adapter for r in engine._running} - {None})
        decode_step()

    engine._decode_step = recording_step
    order = [(0, "a0"), (1, "a1"), (2, "a0"), (3, None), (4, "a1")]  # a1 must wait for a0
    for index, adapter in order:
        prompt = [5 + index, 7, 9]

        def on_event(event, index=index):
            results.setdefault(index, []).extend(event.token_ids)
            if event.finish_reason is not None:
                finished.release()

        engine.submit(prompt, adapter, SamplingParams(max_tokens=3 + index), on_event)
    with engine:
        for _ in order:
            assert finished.acquire(timeout=60)
    assert step_adapters and max(map(len, step_adapters)) == 1  # never two adapters in a step
    assert {"a0"} in step_adapters and {"a1"} in step_adapters
    # requests 2 (a0) and 3 (base) passed request 1 (a1), queued before them: the first step
    # runs 0, 2 and 3
    assert step_adapters[0] == {"a0"} and engine.stats.max_running == 3
    for index, adapter in order:
        assert results[index] == alone_merged(reference, [5 + index, 7, 9], adapter, 3 + index)
    with pytest.raises(ValueError, match="max_loras must be >= 1"):
        Engine(model, bank, max_loras=0)


def test_the_engine_thread_releases_its_openmp_team_whenever_it_runs_out_of_requests(
    served, monkeypatch
):
    """An idle engine would otherwise keep a team that slows other threads' torch work (a
    benchmark's transformers run on the main thread: 17 against 29 tokens/s at 2 threads)."""
    _, model, bank = served
    released = []
    record = lambda: released.append(threading.current_thread().name) or True  # noqa: E731
    monkeypatch.setattr("lorakit.serve.engine.release_idle_team", record)
    with Engine(model, bank, max_batch=2) as engine:
        for done, adapter in enumerate(("a0", "a1"), start=1):
            engine.generate([5, 6, 7], adapter, SamplingParams(max_tokens=3))
            deadline = time.monotonic() + 5
            while released.count("lorakit-engine") < 1 + done and time.monotonic() < deadline:
                time.sleep(0.01)  # the loop releases it before waiting for the next request
        idle_releases = released.count("lorakit-engine")
    assert released[0] == threading.main_thread().name  # start(): the loading thread's team
    assert idle_releases >= 3  # idle at start, then after each of the two requests


def test_sampling_is_reproducible_per_seed_whatever_the_batch(served):
    _, model, bank = served
    params = SamplingParams(max_tokens=6, temperature=1.3, top_p=0.9, seed=11)
    with Engine(model, bank, max_batch=4) as engine:
        alone, _, _ = engine.generate([5, 6, 7], "a1", params)
        crowd = [
            engine.submit(
                [9, 9], "a0", SamplingParams(max_tokens=8, seed=i, temperature=1.0), lambda e: None
            )
            for i in range(3)
        ]
        again, _, _ = engine.generate([5, 6, 7], "a1", params)
        other, _, _ = engine.generate(
            [5, 6, 7], "a1", SamplingParams(max_tokens=6, temperature=1.3, seed=12)
        )
        assert crowd
    assert alone == again and len(alone) == 6
    assert other != alone


def tempered(logits: list[float], temperature: float) -> list[float]:
    """softmax(logits / T), the plain formula in float64."""
    weights = [math.exp(value / temperature) for value in logits]
    return [w / sum(weights) for w in weights]


def shares(draws: list[int], size: int) -> list[float]:
    return [draws.count(token) / len(draws) for token in range(size)]


def test_next_token_top_p_and_temperature():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    generator = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingParams(), generator) == 1
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6)
    assert {next_token(logits, tiny_p, generator) for _ in range(20)} == {1}
    # probabilities 0.024, 0.478, 0.065, 0.433: token 1 alone holds 0.478 < 0.6, so the nucleus
    # is tokens 1 and 3 (0.911 together), renormalised
    half = SamplingParams(temperature=1.0, top_p=0.6)
    draws = [next_token(logits, half, generator) for _ in range(400)]
    assert set(draws) == {1, 3}
    p = tempered(logits.tolist(), 1.0)
    assert abs(draws.count(1) / len(draws) - p[1] / (p[1] + p[3])) < 0.08


def test_batched_greedy_tokens_equal_next_token_row_by_row():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=generator)
    logits[2, [7, 30]] = 100.0  # a tie: the first index wins in both
    logits[4] = 0.0  # all equal
    params = [SamplingParams(), SamplingParams(temperature=1e-6), SamplingParams()] * 2
    params[3] = SamplingParams(temperature=0.7, seed=1)  # a sampled row gets None
    tokens = greedy_tokens(logits, params)
    alone = [next_token(row, p, generator) for row, p in zip(logits, params, strict=True)]
    assert tokens == [alone[0], alone[1], 7, None, 0, alone[5]]
    assert greedy_tokens(logits[:1], [SamplingParams(temperature=1.0)]) == [None]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_softmax_of_logits_over_temperature(temperature):
    """Frequencies of 8000 seeded draws against softmax(logits / T) (binomial sd <= 0.0056;
    T=1 would be off by >= 0.07 somewhere, so the test sees a temperature that is ignored)."""
    logits = [0.0, 0.4, 0.8, 1.2]
    expected = tempered(logits, temperature)
    assert max(abs(a - b) for a, b in zip(expected, tempered(logits, 1.0), strict=True)) > 0.07
    generator = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=temperature)
    draws = [next_token(torch.tensor(logits), params, generator) for _ in range(8000)]
    for got, want in zip(shares(draws, 4), expected, strict=True):
        assert abs(got - want) < 0.025, (shares(draws, 4), expected)


def test_top_p_is_taken_from_the_tempered_probabilities():
    """T=0.5: p = 0.010, 0.548, 0.074, 0.368, so top_p=0.9 keeps tokens 1 and 3 (0.916); at T=1
    (0.058, 0.431, 0.158, 0.352) it would keep token 2 as well."""
    logits = [0.0, 2.0, 1.0, 1.8]
    p = tempered(logits, 0.5)
    generator = torch.Generator().manual_seed(2)
    params = SamplingParams(temperature=0.5, top_p=0.9)
    draws = [next_token(torch.tensor(logits), params, generator) for _ in range(4000)]
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / len(draws) - p[1] / (p[1] + p[3])) < 0.025


def test_stop_strings_cut_the_text_and_hold_back_prefixes():
    tracker = StopTextTracker(("xyz",))
    assert tracker.update("abx") == "ab"  # 'x' may start the stop string
    assert tracker.update("abxy") == ""
    assert tracker.update("abxyzq") == "" and tracker.stopped
    tracker = StopTextTracker(("xyz",))
    assert tracker.update("abx") + tracker.update("abxa", final=True) == "abxa"


def test_engine_stops_at_a_stop_string_and_streams_to_asyncio(served):
    _, model, bank = served
    with Engine(model, bank, LetterTokenizer(), max_batch=4) as engine:
        ids, text, last = engine.generate([1, 2, 3], "a0", SamplingParams(max_tokens=12))
        full = "".join(chr(ord("a") + i % 26) for i in ids)
        assert text == full and last.finish_reason == "length"
        stop = full[3:5]
        _, cut_text, cut_last = engine.generate(
            [1, 2, 3], "a0", SamplingParams(max_tokens=12, stop=(stop,))
        )
        assert cut_last.finish_reason == "stop" and cut_text == full[: full.find(stop)]

        async def collect(prompt, adapter):
            pieces = [e async for e in engine.stream(prompt, adapter, SamplingParams(max_tokens=5))]
            return [i for e in pieces for i in e.token_ids], len(pieces)

        async def main():
            return await asyncio.gather(*(collect([i + 1, 4], f"a{i % 3}") for i in range(6)))

        streamed = asyncio.run(main())
        for i, (ids_streamed, pieces) in enumerate(streamed):
            assert pieces >= 5  # one event per token, then the final one
            assert (
                ids_streamed
                == engine.generate([i + 1, 4], f"a{i % 3}", SamplingParams(max_tokens=5))[0]
            )


def test_unknown_adapter_fails_the_request_not_the_engine(served):
    _, model, bank = served
    with Engine(model, bank) as engine:
        _, _, last = engine.generate([1, 2], "nope", SamplingParams(max_tokens=2))
        assert last.finish_reason == "error" and "nope" in last.error
        assert last.error_kind == "adapter_not_found"
        ids, _, last = engine.generate([1, 2], "a1", SamplingParams(max_tokens=2))
        assert last.finish_reason == "length" and len(ids) == 2


class DiskOnFire(RuntimeError):
    """Not a KeyError or ValueError: an error the engine cannot have foreseen."""


def zero_dim_adapter(name):
    """A file read_adapter accepts but whose lora_A is a 0-d tensor."""
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.tensor(1.0),
        f"{prefix}.lora_B.weight": torch.ones(64, 2),
    }
    return lorakit.LoraConfig(r=2, target_modules=["q_proj"]), tensors


@pytest.mark.parametrize("failure", ["raises", "zero-dim"])
def test_a_failing_adapter_load_ends_only_its_own_request(served, failure):
    reference, model, bank = served
    loaded_before = sorted(bank.names())
    calls, good, bad = [], [], []
    good_done, bad_done = threading.Event(), threading.Event()

    def loader(name):
        calls.append((name, engine.load[0]))  # (adapter, requests running meanwhile)
        if failure == "raises":
            raise DiskOnFire(f"cannot read {name}")
        return zero_dim_adapter(name)

    def on_bad(event):
        bad.append(event)
        if event.finish_reason is not None:
            bad_done.set()

    def on_good(event):
        good.append(event)
        if len(good) == 1:  # the good request is running: now the broken one arrives
            engine.submit([1, 2], "broken", SamplingParams(max_tokens=3), on_bad)
        if event.finish_reason is not None:
            good_done.set()

    engine = Engine(model, bank, max_batch=4, adapter_loader=loader)
    with engine:
        engine.submit([3, 4, 5], "a0", SamplingParams(max_tokens=12), on_good)
        assert bad_done.wait(timeout=60) and good_done.wait(timeout=60)  # (deadlock guards)
        assert calls == [("broken", 1)]  # read once, while the good request was running
        last = bad[-1]
        assert (last.finish_reason, last.completion_tokens) == ("error", 0)
        if failure == "raises":
            assert last.error_kind == "internal" and last.error == "cannot read broken"
        else:
            assert last.error_kind == "invalid_adapter"
            assert "layers.0.self_attn.q_proj.lora_A.weight has shape ()" in last.error
        assert good[-1].finish_reason == "length" and good[-1].error is None
        assert [i for e in good for i in e.token_ids] == alone_merged(
            reference, [3, 4, 5], "a0", 12
        )
        ids, _, after = engine.generate([1, 2], "a1", SamplingParams(max_tokens=2))
        assert after.finish_reason == "length" and len(ids) == 2  # still serving
    assert sorted(bank.names()) == loaded_before  # the failed load evicted nothing


def test_a_request_waiting_for_a_slot_reads_its_adapter_once(served):
    """One slot, held by a running request: the waiting one is read when the slot frees, not
    at every decode step in between."""
    reference, _, _ = served
    model = tiny_models.llama()
    prepare_for_serving(model)
    model.generation_config.eos_token_id = None
    bank = AdapterBank(model, max_rank=8, capacity=1)
    files = {"x": "a0", "y": "a1"}
    calls, events = [], {"x": [], "y": []}
    done = threading.Semaphore(0)

    def loader(name):
        calls.append(name)
        return lorakit.adapter_configs(reference)[files[name]], adapter_tensors(
            reference, files[name]
        )

    def collect(name):
        def on_event(event):
            events[name].append(event)
            if name == "x" and len(events["x"]) == 1:  # x is running: y arrives, must wait
                engine.submit([6, 7], "y", SamplingParams(max_tokens=3), collect("y"))
            if event.finish_reason is not None:
                done.release()

        return on_event

    with Engine(model, bank, adapter_loader=loader) as engine:
        engine.submit([1, 2, 3], "x", SamplingParams(max_tokens=20), collect("x"))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)  # (deadlock guards)
    assert calls == ["x", "y"] and bank.evictions == 1
    for name, prompt, max_tokens in [("x", [1, 2, 3], 20), ("y", [6, 7], 3)]:
        assert events[name][-1].finish_reason == "length"
        got = [i for e in events[name] for i in e.token_ids]
        assert got == alone_merged(reference, prompt, files[name], max_tokens), name


def test_submit_after_stop_raises_instead_of_queueing_forever(served):
    from lorakit.serve.engine import EngineStoppedError

    _, model, bank = served
    engine = Engine(model, bank)
    events = []
    engine.submit([1, 2], "a0", SamplingParams(max_tokens=2), events.append)  # waits for start
    with engine:
        pass
    assert events[-1].finish_reason in ("length", "cancelled")  # served or cancelled, not lost
    with pytest.raises(EngineStoppedError, match="engine is stopped"):
        engine.submit([1, 2], "a0", SamplingParams(max_tokens=2), events.append)
    with engine:  # a restarted engine serves again
        ids, _, last = engine.generate([1, 2], "a0", SamplingParams(max_tokens=2))
    assert last.finish_reason == "length" and len(ids) == 2


def test_a_tiny_temperature_is_greedy(served):
    """2.8e-309 is inside [0, 100] but 1 / 2.8e-309 overflows float64: the logits become inf and
    the probabilities NaN. Such a temperature means greedy."""
    reference, model, bank = served
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    for temperature in (2.8e-309, 1e-300, 1e-9):
        params = SamplingParams(temperature=temperature, seed=3)
        assert next_token(logits, params, torch.Generator().manual_seed(3)) == 1
    with Engine(model, bank, max_batch=4) as engine:
        params = SamplingParams(max_tokens=6, temperature=2.8e-309, seed=4)
        ids, _, last = engine.generate([5, 6, 7], "a1", params)
    assert last.finish_reason == "length" and last.error is None
    assert ids == alone_merged(reference, [5, 6, 7], "a1", 6)


def test_a_row_failing_in_a_decode_step_ends_only_its_request(served, monkeypatch):
    """The sampler raises for one request at its second token (a decode step, the batch
    running): that request ends with an error, the others go on and equal their solo runs."""
    import lorakit.serve.engine as engine_module

    reference, model, bank = served
    calls = []

    def failing_for_seed_13(logits, params, generator):
        if params.seed == 13:
            calls.append(len(calls))
            if len(calls) == 2:
                raise RuntimeError("sampler on fire")
        return next_token(logits, params, generator)

    monkeypatch.setattr(engine_module, "next_token", failing_for_seed_13)
    jobs = [([3, 4, 5], "a0", 7), ([1, 2], "a1", 8), ([9, 8, 7, 6], None, 6), ([4, 4], "a2", 5)]
    events = {index: [] for index in range(len(jobs))}
    finished = threading.Semaphore(0)

    def collector(index):
        def on_event(event):
            events[index].append(event)
            if event.finish_reason is not None:
                finished.release()

        return on_event

    engine = Engine(model, bank, max_batch=4)
    for index, (prompt, adapter, max_tokens) in enumerate(jobs):
        seed = 13 if index == 1 else index
        temperature = 1.0 if index == 1 else 0.0  # greedy rows take one batched argmax
        params = SamplingParams(max_tokens=max_tokens, seed=seed, temperature=temperature)
        engine.submit(prompt, adapter, params, collector(index))
    with engine:  # all queued before the loop starts: they run in one batch
        for _ in jobs:
            assert finished.acquire(timeout=60)  # (deadlock guard)
    assert engine.stats.max_running == 4
    failed = events[1][-1]
    assert failed.finish_reason == "error" and failed.error_kind == "internal"
    assert "sampler on fire" in failed.error and failed.completion_tokens == 1
    for index in (0, 2, 3):
        prompt, adapter, max_tokens = jobs[index]
        assert events[index][-1].finish_reason == "length", events[index][-1]
        got = [i for e in events[index] for i in e.token_ids]
        assert got == alone_merged(reference, prompt, adapter, max_tokens), index


def test_lorakit_generate_greedy_runs_the_engine_and_equals_transformers_generate(monkeypatch):
    """``lorakit generate``'s greedy path is the engine without a bank over a model with its
    adapter injected: the same ids as transformers' ``generate`` on that model."""
    from lorakit.commands import generate as generate_command

    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(**SPECS[0]))
    tiny_models.randomize_adapters(model, std=0.3)
    model.eval().generation_config.eos_token_id = None
    prompt = [5, 9, 2, 7, 7, 1]
    calls = []
    run_engine = generate_command.engine_greedy
    monkeypatch.setattr(
        generate_command,
        "engine_greedy",
        lambda *args: calls.append(args) or run_engine(*args),
    )

    class IdsTokenizer:
        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, 6)}

        def decode(self, ids, skip_special_tokens):
            return ",".join(map(str, ids.tolist() if torch.is_tensor(ids) else ids))

    text = generate_command.generate_text(model, IdsTokenizer(), "x", max_new_tokens=9, raw=True)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False)
    assert len(calls) == 1
    assert text == ",".join(map(str, expected[0, len(prompt) :].tolist()))
