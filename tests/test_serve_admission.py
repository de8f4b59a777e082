"""The engine's admission under a full bank: a slot held by a queued request is not "all
pinned", a request kept waiting too long goes first, a cancelled request waiting for its
adapter's load ends at once, a request's seed leaves torch's global generator alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.requests import QueueFullError
from lorakit.serve.sampling import SamplingParams
from lorakit.state import adapter_configs
from tests import tiny_models
from tests.tiny_models import adapter_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapters():
    """``{name: (config, tensors)}`` of two adapters, as a loader reads them from files."""
    reference = tiny_models.llama()
    for name, targets in (("a0", ["q_proj", "v_proj"]), ("a1", ["o_proj", "k_proj"])):
        config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
        lorakit.inject(reference, config, adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.3)
    configs = adapter_configs(reference)
    return {name: (configs[name], adapter_tensors(reference, name)) for name in ("a0", "a1")}


def one_slot_engine(adapters, delay: float = 0.0, gate=None, calls=None, **options) -> Engine:
    """An engine over a bank with ONE adapter slot whose loader takes ``delay`` seconds (and
    waits for ``gate``, a ``threading.Event``, when given; appends each name it reads to
    ``calls``, a list, when given)."""
    model = tiny_models.llama()
    prepare_for_serving(model)
    model.generation_config.eos_token_id = None

    def loader(name):
        if calls is not None:
            calls.append(name)
        time.sleep(delay)
        if gate is not None:
            assert gate.wait(timeout=60)
        return adapters[name]

    bank = AdapterBank(model, max_rank=2, capacity=1)
    return Engine(model, bank, adapter_loader=loader, **options)


class Finished:
    """Collects each request's last event; ``wait(n)`` until ``n`` requests ended."""

    def __init__(self) -> None:
        self.events, self._done = [], threading.Semaphore(0)

    def __call__(self, event) -> None:
        if event.finish_reason is not None:
            self.events.append(event)
            self._done.release()

    def wait(self, count: int, timeout: float = 60.0) -> list:
        for _ in range(count):
            assert self._done.acquire(timeout=timeout), "a request never finished"
        return self.events


def test_a_slot_held_by_a_queued_request_is_waited_for_not_refused(adapters):
    """A finished load hands its slot to its requests before they run; a request for another
    adapter meanwhile finds the bank full: it must wait, not end 'all pinned' (it did in up to
    13 of 24 requests)."""
    for _ in range(10):
        engine = one_slot_engine(adapters, delay=0.02, max_batch=4)
        finished = Finished()
        for prompt, name in (([1, 2, 3], "a0"), ([4, 5], "a1")):
            engine.submit(prompt, name, SamplingParams(max_tokens=3), finished)
        with engine:
            events = finished.wait(2)
        assert [e.finish_reason for e in events] == ["length", "length"], events


def test_a_request_waiting_for_a_slot_is_not_overtaken_forever(adapters):
    """One slot, a steady stream of requests for the resident adapter: the request for the
    other adapter runs while the stream goes on, once max_batch requests went past it (before,
    it waited until the stream stopped)."""
    engine = one_slot_engine(adapters, max_batch=2).start()
    stream_on, served = threading.Event(), []
    stream_on.set()

    def resubmit(event):
        if event.finish_reason is not None:
            served.append(time.monotonic())
            if stream_on.is_set():
                engine.submit([1, 2, 3], "a0", SamplingParams(max_tokens=2), resubmit)

    try:
        for _ in range(2):
            engine.submit([1, 2, 3], "a0", SamplingParams(max_tokens=2), resubmit)
        time.sleep(0.2)
        other = Finished()
        engine.submit([7, 8], "a1", SamplingParams(max_tokens=2), other)
        assert other.wait(1, timeout=60)[0].finish_reason == "length"
        assert stream_on.is_set()  # it ran while the stream for a0 went on
    finally:
        stream_on.clear()
        engine.stop()


def test_a_cancelled_request_waiting_for_a_load_ends_at_once_and_frees_its_place(adapters):
    """The load is held open until the end: the cancelled request must end without it."""
    gate = threading.Event()
    engine = one_slot_engine(adapters, gate=gate, max_batch=2, max_waiting=1).start()
    try:
        finished = Finished()
        handle = engine.submit([3, 4], "a1", SamplingParams(max_tokens=3), finished)
        with pytest.raises(QueueFullError):
            engine.submit([5], "a1", SamplingParams(max_tokens=1), lambda event: None)
        handle.cancel()
        assert finished.wait(1, timeout=60)[0].finish_reason == "cancelled"
        assert not gate.is_set()  # (ended while its load was still under way)
        engine.submit([5], "a1", SamplingParams(max_tokens=1), lambda event: None)  # room again
    finally:
        gate.set()
        engine.stop()


def test_a_request_after_a_cancelled_one_waits_for_the_same_load(adapters):
    """Cancelling the only request waiting for a load left its adapter with no waiting
    requests, which read as no load under way: the next request for it started a second load,
    a second loader thread reading the same adapter (of two) until the end."""
    gate, calls = threading.Event(), []
    engine = one_slot_engine(adapters, gate=gate, calls=calls, max_batch=2).start()
    try:
        first, second = Finished(), Finished()
        handle = engine.submit([3, 4], "a1", SamplingParams(max_tokens=3), first)
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        handle.cancel()
        assert first.wait(1)[0].finish_reason == "cancelled"
        assert engine._cold.in_flight == 1 and engine._cold.parked == 0  # (the load goes on)
        engine.submit([5, 6], "a1", SamplingParams(max_tokens=2), second)
        while engine._cold.parked != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # (time for a second load job to reach the loader)
        assert (engine.cold_loads, calls) == (1, ["a1"])  # (were 2 loads, 2 reads)
        gate.set()
        assert second.wait(1)[0].finish_reason == "length"
        assert (engine.cold_loads, calls, engine._cold.in_flight) == (1, ["a1"], 0)
    finally:
        gate.set()
        engine.stop()


def test_a_request_without_a_seed_leaves_torchs_global_generator_alone(adapters):
    engine = one_slot_engine(adapters)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    engine.submit([1], None, SamplingParams(temperature=1.0), lambda event: None)
    assert torch.equal(torch.rand(3), expected)


def test_max_batch_below_one_is_refused(adapters):
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        one_slot_engine(adapters, max_batch=0)


def test_a_starving_request_does_not_block_one_that_already_holds_its_slot():
    """One slot: Q's load finishes and hands it the slot while S is starving. Q must run (it
    holds the slot S waits for); it was deferred behind S, and S waited for Q's slot: both
    waited forever."""
    reference = tiny_models.llama()
    targets = {"a0": ["q_proj"], "a1": ["v_proj"], "a2": ["o_proj"]}
    for name, modules in targets.items():
        config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=modules)
        lorakit.inject(reference, config, adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.3)
    configs = adapter_configs(reference)
    files = {name: (configs[name], adapter_tensors(reference, name)) for name in targets}
    gates = {"a2": threading.Event(), "a1": threading.Event()}

    def loader(name):
        if name in gates:
            assert gates[name].wait(timeout=60)
        return files[name]

    model = tiny_models.llama()
    prepare_for_serving(model)
    model.generation_config.eos_token_id = None
    bank = AdapterBank(model, max_rank=2, capacity=1)
    bank.load("a0", *files["a0"])
    engine = Engine(model, bank, adapter_loader=loader, max_batch=2).start()
    finished = Finished()
    try:
        engine.submit([1, 2], "a2", SamplingParams(max_tokens=2), finished)  # Q: load gated
        time.sleep(0.3)
        engine.submit([1, 2, 3], "a0", SamplingParams(max_tokens=100), finished)
        engine.submit([4, 5], "a1", SamplingParams(max_tokens=2), finished)  # S: starves
        for _ in range(4):
            engine.submit([6, 7], "a0", SamplingParams(max_tokens=20), finished)
        time.sleep(0.5)
        gates["a2"].set()  # Q's load ends first and hands Q the slot
        time.sleep(0.5)
        gates["a1"].set()
        events = finished.wait(7, timeout=60)
        assert [e.finish_reason for e in events] == ["length"] * 7
    finally:
        for gate in gates.values():
            gate.set()
        engine.stop()
