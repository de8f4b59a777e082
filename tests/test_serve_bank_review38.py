"""Review 38 of the serving bank.

1. An adapter re-pointed (unloaded, then loaded from another ``lora_path``) between a request's
   look-up and its load is served as the name's new adapter: no false 400 "its files changed
   while being read", no eviction of the new copy, and a read overtaken by the unload records
   no identity; ``remove`` drops the name's identity.
2. A request whose adapter is unknown or unloaded (before, while queued, during its read) gets
   one 404 wording, and no message lists more than 10 adapter names.
3. A bank never has more slots than page numbers (every adapter holds a page), so
   ``/health``'s ``adapter_capacity`` is what can be resident at once.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

import lorakit
from lorakit.io import save_adapter
from lorakit.serve import AdapterBank, prepare_for_serving
from lorakit.serve.adapter_dirs import file_identity
from lorakit.serve.pool_sizes import BudgetTooSmall, pool_sizes
from lorakit.serve.requests import ADAPTER_NOT_FOUND, Event
from lorakit.serve.responses import failure
from tests import tiny_models
from tests.serving import (
    AUTH,
    Served,
    assert_error,
    base_model,
    engine_held,
    fresh_logprobs,
    metaspace_tokenizer,
    served_logprobs,
    wait_until,
    write_adapters,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 2e-4  # float32 serving against the float64 oracle


def not_found(name: str) -> str:
    return (
        f"the model {name!r} does not exist: unknown adapter {name!r} (never loaded, or "
        "unloaded); see GET /v1/models"
    )


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """``(root, tokenizer, oracle)``: ad0..ad3 plus v1 and v2 (q/v, r=2, other weights and
    alpha) under ``root/adapters``; ``oracle[v]``: load_adapter's float64 logprobs of v."""
    root, tokenizer = write_adapters(tmp_path_factory.mktemp("review38"))
    reference = base_model(tokenizer)
    for name, alpha in (("v1", 3), ("v2", 9)):
        config = lorakit.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        lorakit.inject(reference, config, adapter_name=name)
    tiny_models.randomize_adapters(reference, seed=11, std=0.5)
    for name in ("v1", "v2"):
        save_adapter(reference, root / "adapters", name)
    oracle = {v: fresh_logprobs(root / "adapters" / v, tokenizer) for v in ("v1", "v2")}
    assert max(abs(a - b) for a, b in zip(*oracle.values(), strict=True)) > 100 * TOL
    return root, tokenizer, oracle


def close(got, want) -> bool:
    return len(got) == len(want) and all(abs(a - b) < TOL for a, b in zip(got, want, strict=True))


class Counted:
    """Reads and evictions a request makes, apart from the admin's own (``admin`` set)."""

    def __init__(self, served: Served) -> None:
        self.admin, self.reads, self.evictions = False, 0, 0
        adapters, bank = served.adapters, served.bank
        read, evict = adapters._read, bank.evict

        def counted_read(*args):
            self.reads += not self.admin
            return read(*args)

        def counted_evict(*args):
            self.evictions += not self.admin
            return evict(*args)

        adapters._read, bank.evict = counted_read, counted_evict


def repoint_on_lookup(served: Served, counted: Counted, reload_from: str | None) -> dict:
    """The reviewer's hook: right after a request looked ``hot`` up (``drop_if_deleted`` runs
    next), an admin unloads it and, unless ``reload_from`` is None, loads it from there."""
    adapters, original = served.adapters, served.adapters.drop_if_deleted
    state = {"done": False}

    def hooked(name, path):
        if name == "hot" and not state["done"]:
            state["done"], counted.admin = True, True
            adapters.remove("hot")
            if reload_from is not None:
                state["loaded"] = adapters.add("hot", reload_from)
            counted.admin = False
        return original(name, path)

    adapters.drop_if_deleted = hooked
    return state


def test_a_request_racing_a_repoint_is_served_the_new_adapter(versions):
    root, tokenizer, oracle = versions
    served = Served(root, tokenizer)
    with served.client:
        assert served.adapters.add("hot", "v1") is True
        assert close(served_logprobs(served, "hot"), oracle["v1"])
        counted = Counted(served)
        state = repoint_on_lookup(served, counted, "v2")
        got = served_logprobs(served, "hot")  # (was a 400 "its files changed ... (3 times)")
        assert state == {"done": True, "loaded": True}
        assert close(got, oracle["v2"]), (got, oracle)
        assert (counted.reads, counted.evictions) == (0, 0)  # the admin's copy serves
        v2 = root / "adapters" / "v2"
        assert served.adapters._identities["hot"] == file_identity(v2)
        assert close(served_logprobs(served, "hot"), oracle["v2"])


def test_ensure_loaded_after_a_repoint_neither_raises_nor_reloads(versions):
    root, tokenizer, _ = versions
    served = Served(root, tokenizer)
    served.adapters.add("hot", "v1")
    counted = Counted(served)
    repoint_on_lookup(served, counted, "v2")
    served.adapters.ensure_loaded("hot")
    assert "hot" in served.bank and served.adapters.registry.path("hot").name == "v2"
    assert (counted.reads, counted.evictions) == (0, 0)


def test_a_request_racing_an_unload_is_the_one_404(versions):
    root, tokenizer, _ = versions
    served = Served(root, tokenizer)
    with served.client:
        served.adapters.add("hot", "v1")
        repoint_on_lookup(served, Counted(served), None)
        response = served.post("/v1/completions", {"model": "hot", "prompt": "hi"})
        error = assert_error(response, 404, "model")
        assert error == {
            "message": not_found("hot"),
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }


def test_remove_drops_the_identity(versions):
    root, tokenizer, _ = versions
    served = Served(root, tokenizer)
    served.adapters.add("hot", "v1")
    assert served.adapters._identities["hot"] == file_identity(root / "adapters" / "v1")
    served.adapters.remove("hot")
    assert "hot" not in served.adapters._identities


def test_a_read_overtaken_by_a_repoint_records_no_identity(versions):
    """A lazy read of v1 during which an admin re-points ``hot`` to v2 (whose load commits
    first): the bank serves v2, and ``_identities`` must say v2, else the next request evicts
    and reads v2 again for nothing."""
    root, tokenizer, oracle = versions
    served = Served(root, tokenizer)
    adapters = served.adapters
    adapters.add("hot", "v1")
    served.bank.evict("hot")
    original, state = adapters._read_unchanged, {"done": False}

    def hooked(name, path):
        result = original(name, path)
        if path.name == "v1" and not state["done"]:
            state["done"] = True
            adapters.remove("hot")
            adapters.add("hot", "v2")
        return result

    adapters._read_unchanged = hooked
    served.bank.ensure_loaded("hot", adapters.read)  # commits nothing: v2 is in (serves)
    assert state["done"]
    assert adapters._identities["hot"] == file_identity(root / "adapters" / "v2")
    counted = Counted(served)
    adapters.ensure_loaded("hot")
    assert (counted.reads, counted.evictions) == (0, 0)
    with served.client:
        assert close(served_logprobs(served, "hot"), oracle["v2"])


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """ad0..ad3 and 40 more adapters (hard links of them) under ``root/adapters``."""
    root, tokenizer = write_adapters(tmp_path_factory.mktemp("many"))
    for index in range(40):
        directory = root / "adapters" / f"tenant-{index:04d}"
        directory.mkdir()
        for file in (root / "adapters" / f"ad{index % 4}").iterdir():
            os.link(file, directory / file.name)
    return root, tokenizer


def test_a_request_queued_while_its_adapter_is_unloaded_gets_the_one_short_404(many):
    served = Served(*many)
    results = {}
    with served.client:
        with engine_held(served.engine):
            body = {"model": "ad1", "prompt": "hello world", "max_tokens": 2}
            asking = threading.Thread(
                target=lambda: results.update(r=served.post("/v1/completions", body))
            )
            asking.start()
            wait_until(lambda: len(served.engine._waiting) > 0)
            reply = served.post("/v1/unload_lora_adapter", {"lora_name": "ad1"}, AUTH)
            assert reply.status_code == 200
        asking.join(60)
        error = assert_error(results["r"], 404, "model")  # (was 44 names, 700 characters)
        assert error["message"] == not_found("ad1") and error["code"] == "model_not_found"
        for model in ("ad1", "never-there"):  # unloaded before; never loaded: the same words
            response = served.post("/v1/completions", {"model": model, "prompt": "hi"})
            assert assert_error(response, 404, "model")["message"] == not_found(model)


def test_the_engine_404s_have_the_one_wording_whatever_the_reason():
    for reason in (
        "adapter 'ad1' was unloaded while it was being read",
        "unknown adapter 'ad1'; known: ['ad0']",
        "'ad1'",
    ):
        event = Event("", (), "error", error=reason, error_kind=ADAPTER_NOT_FOUND)
        error = failure(event, "ad1")
        assert (error.status, error.message, error.code) == (
            404,
            not_found("ad1"),
            "model_not_found",
        )


def test_the_registry_lists_ten_names_then_how_many_more(many):
    served = Served(*many)
    registry = served.adapters.registry
    names = registry.names()
    assert len(names) == 44
    with pytest.raises(KeyError) as unknown:
        registry.path("nope")
    shown = sorted(names)[:10]
    assert unknown.value.args[0] == (
        f"unknown adapter 'nope'; known: {shown} and 34 more; GET /v1/models lists them"
    )
    for name in list(names)[4:]:  # 4 left: all listed
        registry.unregister(name)
    with pytest.raises(KeyError) as few:
        registry.path("nope")
    assert few.value.args[0] == "unknown adapter 'nope'; known: ['ad0', 'ad1', 'ad2', 'ad3']"


# --- 3. slots never more than page numbers -------------------------------------------------

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def by_hand(bank: AdapterBank) -> int:
    """Every pool and scaling tensor of the bank, counted from the tensors."""
    return sum(
        t.numel() * t.element_size()
        for s in bank._stacks.values()
        for t in (s.lora_A, s.lora_B_t, s.scaling)
    )


def most_resident(load, names, bank: AdapterBank) -> int:
    """The most adapters resident at once while ``load`` brings ``names`` in one by one."""
    most = 0
    for name in names:
        load(name)
        most = max(most, len(bank.names()))
    return most


def test_the_least_budget_has_one_slot_and_one_max_rank_adapters_pages():
    """Review 38's t1 case: max_rank 64, all-linear, float32: the budget BudgetTooSmall names,
    counted by hand from the layer shapes, is 16 pages and one slot (not as many slots as
    pages, which the doc said)."""
    model = tiny_models.llama()
    shapes = [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if n.split(".")[-1] in ALL_LINEAR
    ]
    prepare_for_serving(model, ALL_LINEAR)
    per_page = sum(4 * (k + d) * 4 for k, d in shapes)  # page_rank 4, float32
    least = 16 * per_page + 4 * len(shapes)  # 16 pages of rank 4 in every pool, one slot
    bank = AdapterBank(model, max_rank=64, memory_budget=least)
    assert (bank.capacity, bank.pages) == (1, 16)
    assert by_hand(bank) == least
    with pytest.raises(BudgetTooSmall):
        AdapterBank(model, max_rank=64, memory_budget=least - 1)
    roomy = AdapterBank(model, max_rank=64, memory_budget=40 * least)
    assert roomy.capacity == roomy.pages  # a roomy budget: as many slots as pages


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    """Review 38's t10 setup: a saved tiny Llama, 6 q/v rank-4 adapters and 2 all-linear ones
    (r 16 and 8), whose layer shares size the pools of ``lorakit serve``."""
    root = tmp_path_factory.mktemp("cli38")
    tokenizer = metaspace_tokenizer()
    tiny_models.save_llama_with_tokenizer(root / "model", tokenizer, max_position_embeddings=96)
    reference = base_model(tokenizer)
    specs = [dict(r=4, target_modules=["q_proj", "v_proj"])] * 6
    specs += [dict(r=16, target_modules="all-linear"), dict(r=8, target_modules="all-linear")]
    for index, spec in enumerate(specs):
        config = lorakit.LoraConfig(lora_alpha=8, **spec)
        lorakit.inject(reference, config, adapter_name=f"ad{index}")
    tiny_models.randomize_adapters(reference, std=0.4)
    for index in range(len(specs)):
        save_adapter(reference, root / "adapters", f"ad{index}")
    return root


def test_the_cli_budget_with_layer_shares_has_no_slot_it_cannot_use(cli_root):
    from fastapi.testclient import TestClient

    from lorakit.cli import build_parser
    from lorakit.commands.serve import build

    root = cli_root
    args = ["serve", "--model", str(root / "model"), "--adapters", str(root / "adapters")]
    app = build(build_parser().parse_args([*args, "--adapter-memory", "123457"]))
    adapters = app.state.adapters
    bank = adapters.bank
    assert by_hand(bank) <= 123457
    capacity = TestClient(app).get("/health").json()["adapter_capacity"]
    resident = most_resident(adapters.ensure_loaded, [f"ad{i}" for i in range(6)], bank)
    assert resident == 4 == bank.pages  # six rank-4 adapters of one page each: 4 fit at once
    assert capacity == bank.capacity == resident  # (was 6 slots on 4 pages)


def test_pool_sizes_never_give_more_slots_than_pages():
    """Random layer sizes, shares and budgets: slots <= pages <= slots x per_adapter, within
    the budget counted from the returned lengths."""
    rng = random.Random(38)
    checked = 0
    for _ in range(3000):
        layers = {f"l{i}": rng.choice([8, 40, 96, 500, 3000]) for i in range(rng.randint(1, 6))}
        shares = {name: rng.choice([0.1, 0.25, 0.5, 1.0]) for name in layers}
        per_adapter, overhead = rng.choice([1, 4, 16]), rng.choice([0, 4, 56, 900])
        least = per_adapter * sum(layers.values()) + overhead
        budget = int(least * rng.choice([1, 1.01, 1.3, 2, 5, 40]))
        try:
            sizes = pool_sizes(
                layers,
                max_rank=per_adapter * 4,
                per_adapter=per_adapter,
                slot_overhead=overhead,
                capacity=rng.choice([None, 3, 1000]),
                memory_budget=budget,
                shares=rng.choice([None, shares]),
            )
        except BudgetTooSmall:
            assert budget < least
            continue
        used = sum(n * layers[name] for name, n in sizes.lengths.items())
        assert used + sizes.slots * overhead <= budget
        assert 1 <= sizes.slots <= sizes.pages <= sizes.slots * per_adapter, sizes
        assert min(sizes.lengths.values()) >= per_adapter
        checked += 1
    assert checked > 2000
