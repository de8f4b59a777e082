"""The one-adapter route (``lorakit.serve.one_adapter``): every token on the same adapter gives
what the batched op gives (and what the adapter injected and run alone gives), with the slot's
pages as views of the pools or gathered, and for a DoRA slot; the engine takes it for one
stream."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, prepare_for_serving, routed
from lorakit.serve import routing as routing_module
from lorakit.serve.engine import Engine
from lorakit.serve.one_adapter import OneAdapterRouter, page_range, routed_one
from lorakit.serve.sampling import SamplingParams
from lorakit.state import lora_layers
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = {
    "qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=8, lora_alpha=8, target_modules="all-linear"),
    "mlp": dict(r=6, lora_alpha=3, target_modules=["down_proj", "up_proj"], use_rslora=True),
}


@pytest.fixture(scope="module")
def setup():
    reference = tiny_models.llama()
    for name, spec in SPECS.items():
        lorakit.inject(reference, lorakit.LoraConfig(**spec), adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.1)
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=8, capacity=3, page_rank=2)
    for name in SPECS:
        bank.load_from_model(name, reference, name)
    return reference, model, bank


def test_page_range_takes_any_run_of_consecutive_pages():
    assert page_range(torch.tensor([3, 4, 5])) == slice(3, 6)
    assert page_range(torch.tensor([5, 4, 3])) == slice(3, 6)  # refilled free pages come reversed
    assert page_range(torch.tensor([7])) == slice(7, 8)
    assert page_range(torch.tensor([3, 5])) is None
    assert page_range(torch.tensor([0, 2, 1, 4])) is None


@pytest.mark.parametrize("name", list(SPECS))
def test_one_adapter_route_equals_the_batched_op_and_the_adapter_alone(setup, name):
    reference, model, bank = setup
    ids = tiny_models.input_ids(2, 7)
    slot = bank.slot_of(name)
    with routed_one(OneAdapterRouter(bank, slot)) as router:
        got = model(ids).logits
    assert router.page_range is not None  # a bank filled once holds runs of pages
    with routed(bank, torch.full(ids.shape, slot)):
        batched = model(ids).logits
    with torch.no_grad(), lorakit.use_adapters(reference, [name]):
        alone = reference(ids).logits
        base = model(ids).logits
    torch.testing.assert_close(got, batched, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapter matters


def test_scattered_pages_are_gathered_and_give_the_same_output(setup, monkeypatch):
    reference, model, bank = setup
    slot = bank.slot_of("all")
    pages = bank.page_table[slot]
    stack = next(bank.stack_for(layer) for _, layer in lora_layers(model))
    contiguous = OneAdapterRouter(bank, slot).factors(stack)
    assert contiguous[0].data_ptr() == stack.lora_A[pages.min()].data_ptr()  # a view, no copy
    monkeypatch.setattr("lorakit.serve.one_adapter.page_range", lambda pages: None)
    gathered = OneAdapterRouter(bank, slot)
    assert gathered.page_range is None
    gathered_A, gathered_B_t = gathered.factors(stack)  # rows in page-table order: B A equal
    torch.testing.assert_close(
        contiguous[1].T @ contiguous[0], gathered_B_t.T @ gathered_A, rtol=0, atol=1e-6
    )
    ids = tiny_models.input_ids(1, 5)
    with routed_one(OneAdapterRouter(bank, slot)):
        got = model(ids).logits
    with torch.no_grad(), lorakit.use_adapters(reference, ["all"]):
        alone = reference(ids).logits
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_a_dora_slot_takes_the_batched_path_and_equals_the_adapter_alone():
    reference = tiny_models.llama()
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    lorakit.inject(reference, config, adapter_name="dora")
    tiny_models.randomize_adapters(reference, std=0.3)
    with torch.no_grad():
        for _, layer in lora_layers(reference):
            layer.lora_magnitude_vector["dora"].weight.mul_(1.5)  # f != 1: the gain matters
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj"])
    bank = AdapterBank(model, max_rank=2, capacity=1)
    slot = bank.load_from_model("dora", reference, "dora")
    ids = tiny_models.input_ids(2, 6)
    with routed_one(OneAdapterRouter(bank, slot)):
        got = model(ids).logits
    with torch.no_grad(), lorakit.use_adapters(reference, ["dora"]):
        alone = reference(ids).logits
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)


def test_the_engine_routes_one_stream_through_the_one_adapter_route(setup, monkeypatch):
    reference, model, bank = setup
    calls = []
    original = routing_module.routed_one
    monkeypatch.setattr(
        routing_module, "routed_one", lambda router: calls.append(router) or original(router)
    )
    prompt, tokens = [5, 9, 2, 7, 7, 1], 6
    with Engine(model, bank, max_batch=2, eos_token_ids=[]) as engine:
        got, _, _ = engine.generate(prompt, "mlp", SamplingParams(max_tokens=tokens))
    assert len(calls) == tokens  # the prefill and every decode step, one router kept throughout
    assert {router.slot for router in calls} == {bank.slot_of("mlp")}
    assert len({id(router) for router in calls}) == 1
    with torch.no_grad(), lorakit.use_adapters(reference, ["mlp"]):
        reference.generation_config.eos_token_id = None
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
    assert got == out[0, len(prompt) :].tolist()


def test_a_kept_router_is_dropped_when_its_slot_gets_another_adapter():
    """The engine keeps a slot's router between steps; an adapter loaded into that slot after an
    eviction (new pages) gets a new router, and its own output."""
    reference = tiny_models.llama()
    for name in ("first", "second"):
        config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
        lorakit.inject(reference, config, adapter_name=name)
    tiny_models.randomize_adapters(reference, std=0.2)
    reference.generation_config.eos_token_id = None
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj", "up_proj"])
    bank = AdapterBank(model, max_rank=4, capacity=1, page_rank=2)
    prompt, params = [3, 8, 1, 4], SamplingParams(max_tokens=5)
    with Engine(model, bank, max_batch=1, eos_token_ids=[]) as engine:
        slot = bank.load_from_model("first", reference, "first")
        first, _, _ = engine.generate(prompt, "first", params)
        kept = engine._routing.one_routers[slot]
        bank.evict("first")
        assert bank.load_from_model("second", reference, "second") == slot
        assert not kept.is_current()
        second, _, _ = engine.generate(prompt, "second", params)
        assert engine._routing.one_routers[slot] is not kept
    for name, got in (("first", first), ("second", second)):
        with torch.no_grad(), lorakit.use_adapters(reference, [name]):
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
        assert got == out[0, len(prompt) :].tolist(), name
    assert first != second


def test_the_engine_keeps_only_the_most_recent_routers(setup, monkeypatch):
    """Each kept router may hold its adapter's scaled A factors (the lean step's sibling
    products): the engine keeps the ``ONE_ROUTERS_KEPT`` most recently used, and a dropped one is
    made again when its adapter comes back, with the same tokens."""
    _, model, bank = setup
    monkeypatch.setattr(routing_module, "ONE_ROUTERS_KEPT", 2)
    params = SamplingParams(max_tokens=4)
    with Engine(model, bank, max_batch=1, eos_token_ids=[]) as engine:
        first = engine.generate([3, 8, 1], "qv", params)[0]
        for name in ("all", "mlp"):
            engine.generate([3, 8, 1], name, params)
        assert list(engine._routing.one_routers) == [bank.slot_of("all"), bank.slot_of("mlp")]
        assert engine.generate([3, 8, 1], "qv", params)[0] == first
        assert list(engine._routing.one_routers) == [bank.slot_of("mlp"), bank.slot_of("qv")]
