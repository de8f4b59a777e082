"""Where the bank puts an adapter's pages (``serve/pages.py``) and how the batched op reads them
(``serve/row_groups.py``): aligned runs read in place as whole-adapter windows, and every other
placement (a bank fragmented by evictions and loads of other ranks, scattered pages, adapters
far apart) still gives each row its adapter's float64 formula."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.serve import AdapterBank, group_rows, prepare_for_serving, routed
from lorakit.serve.bank import BankFullError
from lorakit.serve.pages import FreePages
from lorakit.serve.pool_sizes import layer_shares
from lorakit.serve.residency import Residency
from lorakit.state import lora_layers
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "up_proj"]


def test_free_pages_prefer_an_aligned_run_then_a_run_then_the_lowest_pages():
    pages = FreePages(12)
    assert pages.take(1) == [0]
    assert pages.take(4) == [4, 5, 6, 7]  # aligned: 1..4 is a run, but starts at 1
    assert pages.take(2) == [2, 3]
    assert pages.take(3) == [9, 10, 11]  # 8..10 would be a run, 9 is the aligned start
    assert pages.count == 2  # pages 1 and 8 are free
    pages.give([4, 5, 6, 7])
    assert pages.take(3) == [6, 7, 8]  # aligned, although 4..6 comes first
    assert pages.take(3) == [1, 4, 5]  # no run of 3 left: the lowest free pages
    assert pages.count == 0
    with pytest.raises(ValueError, match="cannot take 1 pages: 0 are free"):
        pages.take(1)
    with pytest.raises(ValueError, match="page 3 is free already"):
        pages.give([2, 3, 3])
    unaligned = FreePages(6)
    assert unaligned.take(1) == [0] and unaligned.take(4) == [1, 2, 3, 4]  # no aligned run of 4


def test_a_grid_of_one_rank_reads_whole_adapters_in_place_and_mixed_ranks_read_pages():
    one_rank = {0: torch.arange(0, 4), 1: torch.arange(4, 8), 2: torch.arange(12, 16)}
    grid = group_rows([2, 0, 1], one_rank, mode="padded").padded()[0]
    assert grid.block == 4 and grid.window_run == slice(0, 4)  # window 2: a filler
    assert grid.entry_slots.tolist() == [0, 1, 2, 2] and grid.gather_rows.tolist() == [1, 2, 0, 0]
    assert grid.valid.tolist() == [0, 1, 3] and grid.dest_rows.tolist() == [1, 2, 0]
    two_ranks = dict(one_rank) | {3: torch.tensor([16, 17])}  # rank 8: windows of 2 pages
    grid = group_rows([0, 3, 2], two_ranks, mode="padded").padded()[0]
    assert grid.block == 2 and grid.window_run == slice(0, 9)
    assert grid.dest_rows.tolist() == [0, 0, 2, 2, 1]
    far_apart = {0: torch.arange(0, 4), 5: torch.arange(40, 44)}
    grid = group_rows([5, 0], far_apart, mode="padded").padded()[0]
    assert grid.block == 4 and grid.window_run is None  # 11 windows for 2: gathered
    assert grid.windows.tolist() == [0, 10] and grid.entry_slots.tolist() == [0, 5]
    unaligned = {0: torch.arange(1, 5), 1: torch.arange(5, 9)}  # runs of 4 from page 1
    assert group_rows([0, 1], unaligned, mode="padded").padded()[0].block == 1
    scattered = {0: torch.arange(0, 4), 1: torch.tensor([4, 6])}
    assert group_rows([0, 1], scattered, mode="padded").padded()[0].block == 1


def random_adapter(
    rank: int, seed: int, targets: list[str] = TARGETS
) -> tuple[lorakit.LoraConfig, dict]:
    """PEFT-keyed random A (r, k) and B (d, r), non-zero, on ``targets`` of the tiny Llama;
    alpha = 3 r / 2 + 1."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in tiny_models.llama().named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            d, k = module.weight.shape
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, k, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d, rank, generator=generator) * 0.1
    config = lorakit.LoraConfig(r=rank, lora_alpha=1.5 * rank + 1, target_modules=targets)
    return config, tensors


def served_bank(pages: int, max_rank: int = 16) -> tuple[torch.nn.Module, AdapterBank]:
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    probe = AdapterBank(model, max_rank=4, capacity=1)  # one page per adapter
    budget = pages * (probe.page_bytes + probe.slot_overhead)
    return model, AdapterBank(model, max_rank=max_rank, memory_budget=budget)


def check_rows_match_float64(model, bank, adapters: dict, token_slots: torch.Tensor) -> None:
    """Every LoRA layer, every mode: row i gets ``W0 x_i + s B A x_i`` of its slot's adapter
    (``adapters``: name -> (config, tensors)), computed in float64 from the loaded tensors."""
    slot_names = {bank.slot_of(name): name for name in adapters}
    for path, layer in lora_layers(model):
        x = torch.randn(token_slots.numel(), layer.in_features, generator=torch.Generator())
        expected = layer.base_layer(x).double()
        for row, slot in enumerate(token_slots.tolist()):
            config, tensors = adapters[slot_names[slot]] if slot >= 0 else (None, {})
            if f"base_model.model.{path}.lora_A.weight" in tensors:  # the adapter adapts it
                A = tensors[f"base_model.model.{path}.lora_A.weight"].double()
                B = tensors[f"base_model.model.{path}.lora_B.weight"].double()
                expected[row] += config.lora_alpha / config.r * (B @ (A @ x[row].double()))
        for mode in (None, "loop", "padded"):
            with routed(bank, token_slots, mode=mode):
                got = layer(x)
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
        assert (expected - layer.base_layer(x).double()).abs().max() > 1e-1  # adapters matter


def test_free_pages_from_the_end_mirror_the_preferences():
    pages = FreePages(12)
    assert pages.take(1, from_end=True) == [11]
    assert pages.take(4, from_end=True) == [4, 5, 6, 7]  # the last aligned run: 8..11 holds 11
    assert pages.take(2, from_end=True) == [8, 9]
    assert pages.take(3, from_end=True) == [0, 1, 2]  # 9..11, 6..8, 3..5 are not free
    assert pages.take(2, from_end=True) == [3, 10]  # no run of 2 left: the highest free pages


def test_adapters_of_some_layers_sit_at_the_end_and_a_layer_reads_only_its_adapters():
    model, bank = served_bank(pages=16)
    adapters = {
        "all_a": random_adapter(8, seed=1),
        "q_a": random_adapter(4, seed=2, targets=["q_proj"]),
        "all_b": random_adapter(4, seed=3),
        "q_b": random_adapter(8, seed=4, targets=["q_proj"]),
    }
    for name, adapter in adapters.items():
        bank.load(name, *adapter)
    table = {name: bank.page_table[bank.slot_of(name)].tolist() for name in adapters}
    assert table == {"all_a": [0, 1], "q_a": [15], "all_b": [2], "q_b": [12, 13]}
    token_slots = torch.tensor([bank.slot_of(name) for name in [*adapters, "all_a", "q_b"]])
    up_proj = next(layer for path, layer in lora_layers(model) if path.endswith("up_proj"))
    q_proj = next(layer for path, layer in lora_layers(model) if path.endswith("q_proj"))
    with routed(bank, token_slots, mode="padded") as plan:
        one_row, two_rows = plan.padded(bank.stack_for(up_proj).present)
        # up_proj: only the all-linear adapters, one compact run of pages read in place
        assert one_row.entry_slots.tolist() == [bank.slot_of("all_b")]
        assert two_rows.window_run == slice(0, 1) and two_rows.block == 2  # all_a's 2 pages
        assert one_row.window_run == slice(2, 3)
        q_grids = plan.padded(bank.stack_for(q_proj).present)
        assert sorted(q_grids[0].entry_slots.tolist()) == sorted(
            [bank.slot_of("q_a"), bank.slot_of("all_b")]
        )
    check_rows_match_float64(model, bank, adapters, token_slots)


def test_a_bank_fragmented_by_evictions_and_loads_gives_each_row_its_adapter():
    model, bank = served_bank(pages=10)
    tensors = {}
    for seed, (name, rank) in enumerate(
        [("r8", 8), ("r4", 4), ("r16", 16), ("r4b", 4)]  # pages 0-1, 2, 4-7 (aligned), 3
    ):
        tensors[name] = random_adapter(rank, seed)
        bank.load(name, *tensors[name])
    bank.evict("r8")
    bank.evict("r4")
    for seed, (name, rank) in enumerate([("r16b", 16), ("r12", 12)], start=10):
        tensors[name] = random_adapter(rank, seed)
        bank.load(name, *tensors[name])
    adapters = {name: tensors[name] for name in bank.names()}
    table = {name: bank.page_table[bank.slot_of(name)].tolist() for name in adapters}
    # r16b: free 0, 1, 2, 8, 9 hold no run of 4: the lowest pages; r12 evicts r16 (least
    # recently used) and takes the first run of 3 (no aligned one)
    assert table == {"r4b": [3], "r16b": [0, 1, 2, 8], "r12": [4, 5, 6]}
    picks = ["r12", "r16b", "r4b", "r16b", "r12", "r4b", "r4b", None]
    token_slots = torch.tensor([bank.slot_of(p) if p else -1 for p in picks])
    with routed(bank, token_slots, mode="padded") as plan:
        # scattered pages and mixed ranks: one entry per page, in each length bucket
        assert [grid.block for grid in plan.padded()] == [1, 1]
    check_rows_match_float64(model, bank, adapters, token_slots)


def test_adapters_of_one_rank_reloaded_into_freed_runs_are_read_in_place_or_gathered():
    model, bank = served_bank(pages=24)
    adapters = {f"a{i}": random_adapter(16, seed=i) for i in range(6)}
    for name, adapter in adapters.items():
        bank.load(name, *adapter)
    for name in ("a1", "a3"):
        bank.evict(name)
        del adapters[name]
    for name in ("b1", "b3"):
        adapters[name] = random_adapter(16, seed=len(adapters) + 10)
        bank.load(name, *adapters[name])
    windows = {name: bank.page_table[bank.slot_of(name)].tolist() for name in ("b1", "b3")}
    assert windows == {"b1": [4, 5, 6, 7], "b3": [12, 13, 14, 15]}  # the freed aligned runs
    every = torch.tensor([bank.slot_of(name) for name in adapters] * 2)
    with routed(bank, every, mode="padded") as plan:
        (grid,) = plan.padded()
        assert grid.block == 4 and grid.window_run == slice(0, 6)
    check_rows_match_float64(model, bank, adapters, every)
    ends = torch.tensor([bank.slot_of("a0"), bank.slot_of("a5"), -1, -1])
    with routed(bank, ends, mode="padded") as plan:
        (grid,) = plan.padded()
        assert grid.window_run is None and grid.windows.tolist() == [0, 5]
    check_rows_match_float64(model, bank, {n: adapters[n] for n in ("a0", "a5")}, ends)


def test_pools_sized_by_layer_shares_hold_more_adapters_in_the_same_budget():
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    probe = AdapterBank(model, max_rank=4, capacity=1)
    budget = 8 * (probe.page_bytes + probe.slot_overhead)  # 8 pages in every pool
    uniform = AdapterBank(model, max_rank=4, memory_budget=budget)
    shares = {path: 1.0 if path.endswith("q_proj") else 0.5 for path, _ in lora_layers(model)}
    bank = AdapterBank(model, max_rank=4, memory_budget=budget, layer_shares=shares)
    assert uniform.pages == 8 and set(uniform.pool_pages.values()) == {8}
    q_pages = {n for p, n in bank.pool_pages.items() if p.endswith("q_proj")}
    up_pages = {n for p, n in bank.pool_pages.items() if p.endswith("up_proj")}
    assert bank.pages > 8 and q_pages == {bank.pages} and up_pages == {bank.pages // 2}
    assert bank.memory_bytes() <= budget
    # all-linear adapters below the up_proj pools' end, q-only ones from the end
    limit = bank.pages // 2
    adapters = {f"all{i}": random_adapter(4, seed=i) for i in range(limit)}
    adapters |= {f"q{i}": random_adapter(4, 50 + i, ["q_proj"]) for i in range(bank.pages - limit)}
    for name in sorted(adapters, key=lambda name: name.startswith("all")):  # q0 first
        bank.load(name, *adapters[name])
    assert len(bank.names()) == bank.pages > 8 and bank.evictions == 0  # uniform: 8 fit
    for name in bank.names():
        page = int(bank.page_table[bank.slot_of(name)][0])
        assert page < limit if name.startswith("all") else page >= limit, (name, page)
    assert bank.resident_bytes() <= bank.memory_bytes()
    # a new all-linear adapter evicts the least recently used adapter below the limit, "all0",
    # not the least recently used one, "q0", whose page is of no use to it
    bank.load("all_new", *random_adapter(4, seed=99))
    assert "all0" not in bank and "q0" in bank
    assert int(bank.page_table[bank.slot_of("all_new")][0]) < limit
    served = {name: adapters.get(name) or random_adapter(4, seed=99) for name in bank.names()}
    picks = ["all_new", "q0", "all1", f"q{bank.pages - limit - 1}", "all_new"]
    check_rows_match_float64(model, bank, served, torch.tensor([bank.slot_of(n) for n in picks]))
    with pytest.raises(BankFullError, match=f"pools for its layers hold {limit} pages"):
        Residency(bank.capacity, bank.pages).require_room(limit + 1, limit, bank.page_rank)


def test_layer_shares_weigh_ranks_and_give_up_on_crossing_sets():
    def factors(rank: int, *paths: str) -> dict:
        return {f"base_model.model.{path}.lora_A.weight": torch.empty(rank, 8) for path in paths}

    qv, every = factors(4, "l.q", "l.v"), factors(12, "l.q", "l.v", "l.up")
    assert layer_shares([qv, every, qv]) == {"l.q": 1.0, "l.v": 1.0, "l.up": 0.6}
    assert layer_shares([qv, factors(4, "l.up")]) == {}  # q/v and MLP-only cross: equal pools
    assert layer_shares([]) == {}


def test_shares_that_name_none_of_the_layers_leave_the_pools_equal():
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    budget = 200_000
    for shares in ({}, {"not.a.layer": 1.0}):
        bank = AdapterBank(model, max_rank=4, memory_budget=budget, layer_shares=shares)
        uniform = AdapterBank(model, max_rank=4, memory_budget=budget)
        assert bank.pool_pages == uniform.pool_pages and bank.pages == uniform.pages


def test_a_load_that_found_no_room_below_its_limit_is_not_read_again_until_there_is():
    model = tiny_models.llama()
    prepare_for_serving(model, TARGETS)
    probe = AdapterBank(model, max_rank=4, capacity=1)
    budget = 8 * (probe.page_bytes + probe.slot_overhead)
    shares = {path: 1.0 if path.endswith("q_proj") else 0.5 for path, _ in lora_layers(model)}
    bank = AdapterBank(model, max_rank=4, memory_budget=budget, layer_shares=shares)
    for index in range(bank.pages // 2):  # every page below the up_proj pools' end, in use
        bank.load(f"all{index}", *random_adapter(4, seed=index))
        bank.acquire(f"all{index}")
    reads = []

    def loader(name):
        reads.append(name)
        return random_adapter(4, seed=99)

    with pytest.raises(BankFullError):
        bank.acquire("late", loader)
    assert reads == ["late"] and bank.has_room() and not bank.room_for("late")
    with pytest.raises(BankFullError):
        bank.acquire("late", loader)
    assert reads == ["late"]  # its files are not read again while there is no room for it
    bank.load("q", *random_adapter(4, seed=7, targets=["q_proj"]))  # room above the limit
    bank.release("all0")
    assert bank.room_for("late")
    bank.acquire("late", loader)
    assert reads == ["late", "late"] and "all0" not in bank and "q" in bank


def test_without_a_budget_every_pool_holds_capacity_adapters_of_the_largest_rank():
    """Layer shares size the pools only within a memory budget: with a capacity alone, an
    adapter of every layer must fit capacity times (a share of 0.25 left room for one)."""
    from lorakit.serve.pool_sizes import pool_sizes

    sizes = pool_sizes(
        {"l.q": 100, "l.up": 300},
        max_rank=8,
        per_adapter=2,
        slot_overhead=10,
        capacity=4,
        memory_budget=None,
        shares={"l.q": 1.0, "l.up": 0.25},
    )
    assert (sizes.slots, sizes.pages) == (4, 8)
    assert sizes.lengths == {"l.q": 8, "l.up": 8}


def test_a_budget_beside_a_capacity_allocates_no_page_the_slots_cannot_use():
    from lorakit.serve.pool_sizes import pool_sizes

    sizes = pool_sizes(
        {"l.q": 100, "l.up": 300},
        max_rank=8,
        per_adapter=2,
        slot_overhead=10,
        capacity=2,
        memory_budget=50_000_000,
    )
    assert (sizes.slots, sizes.pages) == (2, 4)  # (it took the whole budget: 124,999 pages)
    assert sizes.lengths == {"l.q": 4, "l.up": 4}
