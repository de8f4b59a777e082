"""``BankFullError`` says what ran out (``Residency.require_room``): the slots (every one held by
an adapter pinned or used by a running request: --max-adapters) or the pages an adapter needs
below its layers' limit (how many are free, freeable by evicting idle adapters, and held:
--adapter-memory), never "all slots or pages" while most of them are free."""

from __future__ import annotations

import pytest

from lorakit.serve import AdapterBank, BankFullError, prepare_for_serving
from lorakit.state import lora_layers
from tests import tiny_models
from tests.test_serve_pages import TARGETS, random_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RETRY = "or retry later when running requests finish."


def tiny_bank(pages: int, max_rank: int = 16, layer_shares=None) -> AdapterBank:
    """A bank of ``pages`` rank-4 pages (and as many slots) of the tiny Llama's q/up layers."""
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    probe = AdapterBank(model, max_rank=4, capacity=1)
    budget = pages * (probe.page_bytes + probe.slot_overhead)
    return AdapterBank(model, max_rank=max_rank, memory_budget=budget, layer_shares=layer_shares)


def refused(bank: AdapterBank, name: str, rank: int) -> str:
    """The message of a load of a rank-``rank`` adapter the bank has no room for."""
    with pytest.raises(BankFullError) as error:
        bank.load(name, *random_adapter(rank, seed=rank))
    return str(error.value)


def test_slots_full_names_the_slots_and_max_adapters_not_the_pages():
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    bank = AdapterBank(model, max_rank=16, capacity=2)  # 8 pages
    bank.load("pinned", *random_adapter(4, seed=1), pin=True)
    bank.load("busy", *random_adapter(4, seed=2))
    bank.acquire("busy")
    message = refused(bank, "third", 4)  # 6 of 8 pages free: only the slots ran out
    assert message == (
        "all 2 adapter slots hold adapters pinned or used by running requests (1 in use, "
        f"1 pinned and idle); raise --max-adapters, unpin an adapter, {RETRY}"
    )
    reads = []

    def loader(name):
        reads.append(name)
        return random_adapter(4, seed=3)

    with pytest.raises(BankFullError) as lazy:  # LazyLoads._lazy_load: refused before reading
        bank.acquire("third", loader)
    assert str(lazy.value) == message and reads == []


def test_pages_short_while_slots_are_free_says_how_many_pages_and_adapter_memory():
    """The reviewer's case: 1 adapter and 3 of 6 pages in use, a 4-page load refused."""
    bank = tiny_bank(6)
    assert (bank.capacity, bank.pages) == (6, 6)
    bank.acquire("busy", lambda name: random_adapter(12, seed=1))  # 3 pages, in use
    message = refused(bank, "big", 16)  # 4 pages
    assert message == (
        "an adapter of rank up to 16 needs 4 of the bank's 6 pages: 3 are free, 0 more can be "
        "freed by evicting idle adapters, and 3 are held by 1 adapter(s) pinned or used by "
        f"running requests; raise --adapter-memory, {RETRY}"
    )
    assert "slots" not in message and "--max-adapters" not in message


def test_pages_short_counts_free_freeable_and_held_pages_with_pins():
    bank = tiny_bank(8)
    bank.load("busy", *random_adapter(12, seed=1))  # 3 pages
    bank.acquire("busy")
    bank.load("pinned", *random_adapter(8, seed=2), pin=True)  # 2 pages
    bank.load("idle", *random_adapter(4, seed=3))  # 1 page, evictable
    message = refused(bank, "big", 16)
    assert message == (
        "an adapter of rank up to 16 needs 4 of the bank's 8 pages: 2 are free, 1 more can be "
        "freed by evicting idle adapters, and 5 are held by 2 adapter(s) pinned or used by "
        f"running requests; raise --adapter-memory, unpin an adapter, {RETRY}"
    )
    assert bank.names() == ["busy", "pinned", "idle"]  # nothing evicted by the refused load


def test_pages_short_below_a_layer_share_limit_counts_only_the_pages_below_it():
    """up_proj's pools hold 5 of 11 pages: an idle q-only adapter above them frees nothing
    there; the lazy load (``acquire`` with a loader) says the same, without reading again."""
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    shares = {path: 1.0 if path.endswith("q_proj") else 0.5 for path, _ in lora_layers(model)}
    bank = tiny_bank(8, layer_shares=shares)
    assert (bank.pages, sorted(set(bank.pool_pages.values()))) == (11, [5, 11])
    bank.load("busy", *random_adapter(8, seed=1))  # pages 0, 1
    bank.acquire("busy")
    bank.load("idle", *random_adapter(4, seed=2))  # page 2
    bank.load("q", *random_adapter(8, seed=3, targets=["q_proj"]))  # above page 5: idle, no help
    expected = (
        "an adapter of rank up to 16 needs 4 of the 5 pages the pools of its layers hold "
        "(their layer shares of the bank's 11): 2 are free, 1 more can be freed by evicting "
        "idle adapters, and 2 are held by 1 adapter(s) pinned or used by running requests; "
        f"raise --adapter-memory, {RETRY}"
    )
    assert refused(bank, "big", 16) == expected
    reads = []

    def loader(name):
        reads.append(name)
        return random_adapter(16, seed=16)

    with pytest.raises(BankFullError) as lazy:
        bank.acquire("big", loader)
    assert str(lazy.value) == expected and reads == []


def test_slots_and_pages_both_short_name_both_options():
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    bank = AdapterBank(model, max_rank=4, capacity=2)  # 2 pages
    for seed, name in enumerate(["a", "b"]):
        bank.acquire(name, lambda name, seed=seed: random_adapter(4, seed=seed))
    assert refused(bank, "c", 4) == (
        "all 2 adapter slots hold adapters pinned or used by running requests (2 in use, "
        "0 pinned and idle); raise --max-adapters; an adapter of rank up to 4 needs 1 of the "
        "bank's 2 pages: 0 are free, 0 more can be freed by evicting idle adapters, and 2 are "
        f"held by 2 adapter(s) pinned or used by running requests; raise --adapter-memory, {RETRY}"
    )
