"""A thousand adapters on one server: start-up lists them without reading tensor data, the bank
stays within its memory budget and loads the rest on demand, and a cold load never stalls the
running batch (the loads run on loader threads, not on the decode loop)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import lorakit
from lorakit.commands.serve import _adapter_defaults
from lorakit.io import save_adapter
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.engine import Engine
from lorakit.serve.registry import AdapterRegistry, ServedAdapters
from lorakit.serve.sampling import SamplingParams
from tests import tiny_models
from tests.tiny_models import adapter_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANKS = (4, 8, 16, 32, 64)
TARGET_SETS = (["q_proj", "v_proj"], "all-linear")
COUNT = 1000


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """``COUNT`` adapter directories (ranks 4-64, q/v-only or all-linear): ten templates saved
    by lorakit, hard-linked under new names; returns (root, reference model, {name: template})."""
    root = tmp_path_factory.mktemp("thousand")
    reference = tiny_models.llama()
    templates = []
    for rank in RANKS:
        for targets in TARGET_SETS:
            name = f"t{rank}{'qv' if isinstance(targets, list) else 'all'}"
            config = lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
            lorakit.inject(reference, config, adapter_name=name)
            templates.append(name)
    tiny_models.randomize_adapters(reference, std=0.1)
    for name in templates:
        save_adapter(reference, root / "templates", name)
    adapters, of_template = root / "adapters", {}
    for index in range(COUNT):
        template = templates[index % len(templates)]
        directory = adapters / f"ad{index:04d}"
        directory.mkdir(parents=True)
        for file in (root / "templates" / template).iterdir():
            os.link(file, directory / file.name)
        of_template[directory.name] = template
    return adapters, reference, of_template


def test_start_up_lists_a_thousand_adapters_without_reading_tensor_data(thousand, monkeypatch):
    root, _, _ = thousand
    reads = []
    monkeypatch.setattr(
        "lorakit.serve.registry.read_adapter_data", lambda header: reads.append(header) or 1 / 0
    )
    registry = AdapterRegistry(root)
    targets, max_rank, shares = _adapter_defaults(registry)
    assert len(registry.names()) == COUNT and not registry.skipped
    kinds = {target.rsplit(".", 1)[-1] for target in targets}  # every layer of every adapter
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert max_rank == 64
    # the pools' shares: q/v-only adapters inside all-linear ones, the same ranks in each set
    assert len(shares) == 2 * 7  # every layer of the tiny Llama
    for path, share in shares.items():
        assert share == (1.0 if path.endswith(("q_proj", "v_proj")) else 0.5), path
    assert reads == []  # configs and safetensors headers only


def served_model():
    model = tiny_models.llama()
    prepare_for_serving(model)
    model.generation_config.eos_token_id = None
    return model


def greedy_alone(reference, template, prompt, max_tokens):
    """The adapter alone in lorakit.inject's model (unmerged), greedy, as a reference."""
    ids = list(prompt)
    with torch.no_grad(), lorakit.use_adapters(reference, [template]):
        for _ in range(max_tokens):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_a_thousand_adapters_served_within_the_memory_budget(thousand):
    root, reference, of_template = thousand
    model = served_model()
    probe = AdapterBank(model, max_rank=64, capacity=1)
    budget = probe.memory_bytes() * 6  # room for 6 rank-64 adapters, far fewer than 1,000
    bank = AdapterBank(model, max_rank=64, memory_budget=budget)
    adapters = ServedAdapters(bank, AdapterRegistry(root), model)
    names = [f"ad{index:04d}" for index in range(0, COUNT, 37)]  # 28 adapters, all templates
    with Engine(model, bank, max_batch=8, adapter_loader=adapters.read) as engine:
        results = {}
        threads = [
            threading.Thread(
                target=lambda n=n: results.__setitem__(
                    n, engine.generate([3, 1, 4], n, SamplingParams(max_tokens=3))
                )
            )
            for n in names
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert bank.resident_bytes() <= bank.memory_bytes() <= budget
    needed = sum(bank.pages_for(int(of_template[n][1:].rstrip("qval"))) for n in names)
    assert bank.pages < needed and bank.evictions > 0  # all 28 do not fit at once
    held = sum(bank.pages_for(bank.config(name).r) for name in bank.names())
    assert bank.resident_bytes() == held * bank.page_bytes
    for name in names:
        ids, _, last = results[name]
        assert last.finish_reason == "length", (name, last.error)
        assert ids == greedy_alone(reference, of_template[name], [3, 1, 4], 3), name


def test_a_cold_load_does_not_stall_the_running_batch(thousand):
    """The loader of the cold adapter blocks until the hot request has produced all its
    tokens: the hot one finishes while the cold one waits, then the cold one is served."""
    _, reference, _ = thousand
    model = served_model()
    bank = AdapterBank(model, max_rank=64, capacity=4)
    bank.load(
        "hot", lorakit.adapter_configs(reference)["t8all"], adapter_tensors(reference, "t8all")
    )
    gate, loader_entered = threading.Event(), threading.Event()
    loader_threads = []

    def slow_loader(name):
        loader_threads.append(threading.current_thread().name)
        loader_entered.set()
        assert gate.wait(timeout=120)  # (deadlock guard)
        return lorakit.adapter_configs(reference)["t16qv"], adapter_tensors(reference, "t16qv")

    events = {"hot": [], "cold": [], "cold2": []}

    finished = {name: threading.Event() for name in events}

    def collect(name):
        def on_event(event):
            events[name].append(event)
            if event.finish_reason is not None:
                finished[name].set()

        return on_event

    with Engine(model, bank, adapter_loader=slow_loader) as engine:
        engine.submit([5, 6], "cold", SamplingParams(max_tokens=4), collect("cold"))
        assert loader_entered.wait(timeout=120)
        engine.submit([5, 6], "cold", SamplingParams(max_tokens=4), collect("cold2"))
        engine.submit([1, 2, 3], "hot", SamplingParams(max_tokens=12), collect("hot"))
        assert finished["hot"].wait(timeout=120)
        hot_tokens = [i for e in events["hot"] for i in e.token_ids]
        assert len(hot_tokens) == 12 and events["cold"] == [] and events["cold2"] == []
        gate.set()
        assert finished["cold"].wait(timeout=120) and finished["cold2"].wait(timeout=120)
    assert hot_tokens == greedy_alone(reference, "t8all", [1, 2, 3], 12)
    expected = greedy_alone(reference, "t16qv", [5, 6], 4)
    for name in ("cold", "cold2"):
        assert events[name][-1].finish_reason == "length"
        assert [i for e in events[name] for i in e.token_ids] == expected
    assert loader_threads == ["lorakit-adapter-load_0"]  # one load for both, not the loop
    assert engine.cold_loads == 1


def test_a_failed_cold_load_fails_its_requests_only(thousand):
    _, reference, _ = thousand
    model = served_model()
    bank = AdapterBank(model, max_rank=64, capacity=2)
    bank.load("hot", lorakit.adapter_configs(reference)["t4qv"], adapter_tensors(reference, "t4qv"))

    def loader(name):
        raise KeyError(f"unknown adapter {name!r}")

    with Engine(model, bank, adapter_loader=loader) as engine:
        _, _, missing = engine.generate([1], "nope", SamplingParams(max_tokens=2))
        ids, _, served = engine.generate([1], "hot", SamplingParams(max_tokens=2))
    assert missing.finish_reason == "error" and missing.error_kind == "adapter_not_found"
    assert "nope" in missing.error
    assert served.finish_reason == "length" and len(ids) == 2


def test_bank_memory_follows_the_ranks_held(thousand):
    """Pages of ``page_rank`` 4: a budget that holds 1,000 rank-4 adapters holds 62 rank-64
    ones (1/16), and what is resident is counted page by page."""
    _, reference, _ = thousand
    model = served_model()
    config = lorakit.adapter_configs(reference)
    small, large = adapter_tensors(reference, "t4all"), adapter_tensors(reference, "t64all")
    probe = AdapterBank(model, max_rank=64, capacity=1)
    budget = COUNT * (probe.page_bytes + probe.slot_overhead)
    bank = AdapterBank(model, max_rank=64, memory_budget=budget)
    assert bank.pages == COUNT and bank.memory_bytes() <= budget
    for index in range(COUNT):
        bank.load(f"small{index}", config["t4all"], small)
    assert bank.loaded_count == COUNT and bank.evictions == 0
    assert (
        bank.resident_bytes()
        == COUNT * bank.page_bytes
        == bank.memory_bytes() - (bank.capacity * bank.slot_overhead)
    )
    for name in bank.names():
        bank.evict(name)
    assert bank.resident_bytes() == 0
    for index in range(COUNT // 16 + 1):
        bank.load(f"large{index}", config["t64all"], large)
    assert bank.loaded_count == COUNT // 16 and bank.evictions == 1  # the 63rd evicts one
    assert bank.resident_bytes() == (COUNT // 16) * 16 * bank.page_bytes


@pytest.mark.parametrize("mode", [None, "loop", "padded"])
def test_a_mixed_rank_batch_equals_each_adapter_alone(thousand, mode):
    """Ranks 4 to 64 in one batch: every row equals its adapter alone in lorakit.inject's
    model; the padded grid has one entry per page held, not max_rank per adapter."""
    from lorakit.serve import routed

    _, reference, _ = thousand
    model = served_model()
    bank = AdapterBank(model, max_rank=64, capacity=10)
    templates = list(lorakit.adapter_configs(reference))
    for name in templates:
        bank.load_from_model(name, reference, name)
    ids = tiny_models.input_ids(len(templates), 5)
    slots = torch.tensor([bank.slot_of(name) for name in templates])
    with routed(bank, slots[:, None].expand(-1, 5), mode=mode) as plan:
        mixed = model(ids).logits
    for row, name in enumerate(templates):
        with torch.no_grad(), lorakit.use_adapters(reference, [name]):
            alone = reference(ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=1e-5)
    if mode == "padded":
        ranks = [lorakit.adapter_configs(reference)[name].r for name in templates]
        held = sum(r // 4 for r in ranks)  # one entry per page (block 1: ranks differ)
        (grid,) = plan.padded()  # every segment has 5 rows: one length bucket
        assert grid.block == 1 and held == 2 * 31
        assert grid.dest_rows.numel() == 5 * held  # each of the 5 tokens of a row
    with torch.no_grad():
        assert (mixed - model(ids).logits).abs().max() > 1e-2  # the adapters matter


def test_stop_cancels_requests_waiting_for_a_load_and_leaves_no_hold(thousand):
    _, reference, _ = thousand
    model = served_model()
    bank = AdapterBank(model, max_rank=64, capacity=2)
    gate, entered, loaded = threading.Event(), threading.Event(), threading.Event()

    def slow_loader(name):
        entered.set()
        assert gate.wait(timeout=120)  # (deadlock guard)
        return lorakit.adapter_configs(reference)["t4qv"], adapter_tensors(reference, "t4qv")

    events = []
    engine = Engine(model, bank, adapter_loader=slow_loader).start()
    engine.submit([1, 2], "cold", SamplingParams(max_tokens=3), events.append)
    assert entered.wait(timeout=120)
    engine.stop()
    assert [e.finish_reason for e in events] == ["cancelled"]
    original_release = bank.release
    bank.release = lambda name: (original_release(name), loaded.set())
    gate.set()
    assert loaded.wait(timeout=120)  # the loader thread let go of its own hold
    assert "cold" in bank and bank.has_room()
    assert not any(bank.in_use(name) for name in bank.names())


def test_requests_parked_on_a_cold_load_count_against_the_waiting_limit(thousand):
    """A flood of requests for adapters being loaded used to bypass max_waiting (only the
    engine's own queue was counted) and /health showed them nowhere."""
    from lorakit.serve.engine import QueueFullError

    _, reference, _ = thousand
    model = served_model()
    bank = AdapterBank(model, max_rank=64, capacity=4)
    gate, entered = threading.Event(), threading.Event()

    def slow_loader(name):
        entered.set()
        assert gate.wait(timeout=120)  # (deadlock guard)
        return lorakit.adapter_configs(reference)["t16qv"], adapter_tensors(reference, "t16qv")

    done = []
    with Engine(model, bank, adapter_loader=slow_loader, max_waiting=3) as engine:
        for _ in range(3):
            engine.submit([5, 6], "cold", SamplingParams(max_tokens=1), done.append)
        assert entered.wait(timeout=120)
        deadline = time.monotonic() + 60
        while engine.load != (0, 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load == (0, 3)  # all three parked on the one load, and counted
        with pytest.raises(QueueFullError):
            engine.submit([5, 6], "cold", SamplingParams(max_tokens=1), done.append)
        gate.set()
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [event.finish_reason for event in done] == ["length"] * 3
