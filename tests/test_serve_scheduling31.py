"""The engine's scheduling (review 31): requests that wait for ``max_loras`` stay counted as
waiting while the others are prefilled (``max_waiting``, ``load``), no more than ``max_batch``
requests go ahead of a request kept waiting, and ``stop()`` before ``start()`` ends the queued
requests with ``cancelled``. Every request is submitted before ``start()``, so the loop's token
boundaries, and what each one admits, do not depend on timing."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.requests import EngineStoppedError, QueueFullError
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models

SPECS = {
    "a0": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "a1": dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=8, lora_alpha=4, target_modules=["o_proj", "up_proj", "k_proj"]),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served():
    """(reference model with the three adapters, served model, bank holding all three)."""
    reference = tiny_models.llama()
    for name, spec in SPECS.items():
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.3)
    model = tiny_models.llama()
    prepare_for_serving(model)
    bank = AdapterBank(model, max_rank=8, capacity=len(SPECS))
    for name in SPECS:
        bank.load_from_model(name, reference, name)
    model.generation_config.eos_token_id = None  # compare full lengths
    return reference, model, bank


def alone(reference, prompt, adapter, max_tokens):
    """Greedy tokens from transformers' generate with ``adapter`` merged (None: the base)."""
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        if adapter is None:
            with lorakit.disabled(reference):
                out = reference.generate(torch.tensor([prompt]), **kwargs)
        else:
            lorakit.merge(reference, [adapter])
            try:
                with lorakit.use_adapters(reference, [adapter]):
                    out = reference.generate(torch.tensor([prompt]), **kwargs)
            finally:
                lorakit.unmerge(reference)
    return out[0, len(prompt) :].tolist()


class Results:
    """Each request's ids and last event, by key; ``wait()`` until every request ended."""

    def __init__(self) -> None:
        self.ids: dict = {}
        self.last: dict = {}
        self._ended: dict = {}

    def __call__(self, key):
        self.ids[key], self._ended[key] = [], threading.Event()

        def on_event(event):
            self.ids[key].extend(event.token_ids)
            if event.finish_reason is not None:
                self.last[key] = event
                self._ended[key].set()

        return on_event

    def forget(self, key) -> None:
        """``key``'s request was refused: nothing to wait for."""
        del self.ids[key], self._ended[key]

    def wait(self, timeout: float = 120) -> None:
        for key, ended in self._ended.items():
            assert ended.wait(timeout), f"request {key!r} never ended"


def test_requests_waiting_for_max_loras_count_against_max_waiting_during_a_prefill(served):
    """max_loras=1: the a1 and a2 requests wait while the a0 ones are prefilled. They used to be
    held out of the queue until the prefill returned: ``load`` showed 0 waiting and ``submit``
    took all 3 submitted meanwhile against max_waiting=4 while 2 waited (5 waiting)."""
    reference, model, bank = served
    engine = Engine(model, bank, max_batch=4, max_loras=1, max_waiting=4)
    results = Results()
    work = {
        "a0": ([1, 2], "a0", 5),
        "a1": ([4, 4], "a1", 3),
        "a2": ([5, 5], "a2", 3),
        "long": (list(range(60)), "a0", 1),
    }
    for key, (prompt, adapter, max_tokens) in work.items():
        engine.submit(prompt, adapter, SamplingParams(max_tokens=max_tokens), results(key))
    seen, prefilled = {}, []
    prefill_all = engine._prefill_all

    def prefill_and_submit(requests):
        prefilled.append([r.prompt_ids[:2] for r in requests])
        if len(prefilled) == 1:  # during the first prefill: a0 and long admitted, a1 and a2 wait
            seen["load"] = engine.load
            seen["submits"] = []
            for k in range(3):
                prompt = [7, k]
                try:
                    engine.submit(prompt, None, SamplingParams(max_tokens=2), results(k))
                    work[k] = (prompt, None, 2)
                    seen["submits"].append("accepted")
                except QueueFullError as error:
                    results.forget(k)
                    seen["submits"].append(str(error))
        prefill_all(requests)

    engine._prefill_all = prefill_and_submit
    with engine:
        results.wait()
    assert prefilled[0] == [[1, 2], [0, 1]]  # the a0 ones, in their order
    assert seen["load"] == (2, 2)  # 2 being prefilled, a1 and a2 waiting
    refused = "4 requests are already waiting (the limit is 4); retry later"
    assert seen["submits"] == ["accepted", "accepted", refused]
    assert engine.load == (0, 0)
    for key, (prompt, adapter, max_tokens) in work.items():
        assert results.last[key].finish_reason == "length", key
        assert results.ids[key] == alone(reference, prompt, adapter, max_tokens), key


def test_no_more_than_max_batch_requests_go_ahead_of_a_waiting_request(served):
    """max_loras=1, max_batch=4: the a1 request waits for the a0 ones to leave the batch. Once 4
    requests queued behind it were admitted it is starving and nothing else is. Starvation was
    checked only when it was passed over again, at the next token boundary: when three a0
    requests ended at one boundary, three more went ahead, 6 in all (up to 2 * max_batch - 2)."""
    reference, model, bank = served
    max_batch = 4
    engine = Engine(model, bank, max_batch=max_batch, max_loras=1)
    plan = [("a0", 2), ("a0", 3), ("a0", 4), ("a0", 40), ("a1", 3), ("a0", 10), ("a0", 9)]
    plan += [("a0", 8)] + [("a0", 30)] * 12
    results = Results()
    for index, (adapter, max_tokens) in enumerate(plan):
        engine.submit(
            [1 + index, 2], adapter, SamplingParams(max_tokens=max_tokens), results(index)
        )
    admitted = []
    prefill_all = engine._prefill_all

    def recording(requests):
        admitted.extend(r.prompt_ids[0] - 1 for r in requests)  # the plan's indices
        prefill_all(requests)

    engine._prefill_all = recording
    with engine:
        results.wait()
    waiting = plan.index(("a1", 3))
    went_ahead = [index for index in admitted[: admitted.index(waiting)] if index > waiting]
    assert went_ahead == [5, 6, 7, 8]  # max_batch of them, in their order
    assert admitted == [0, 1, 2, 3, 5, 6, 7, 8, waiting, *range(9, len(plan))]
    for index, (_, max_tokens) in enumerate(plan):
        assert results.last[index].finish_reason == "length", index
        assert results.last[index].completion_tokens == max_tokens, index
    prompt = [1 + waiting, 2]
    assert results.ids[waiting] == alone(reference, prompt, "a1", 3)


def test_stop_before_start_cancels_the_queued_requests(served):
    """No loop ever ran to end them: they used to get no event at all."""
    _, model, bank = served
    engine = Engine(model, bank)
    results = Results()
    for key in ("first", "second"):
        engine.submit([1, 2], "a0", SamplingParams(max_tokens=2), results(key))
    engine.stop()
    results.wait(timeout=5)
    for key in ("first", "second"):
        assert results.last[key].finish_reason == "cancelled"
        assert (results.ids[key], results.last[key].completion_tokens) == ([], 0)
    assert engine.load == (0, 0) and engine.stats.cancelled == 2
    with pytest.raises(EngineStoppedError):
        engine.submit([1, 2], "a0", SamplingParams(max_tokens=2), results("late"))
