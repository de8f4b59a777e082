"""The adapter bank and the batched multi-adapter op, checked against each request run alone.

Reference: the same adapters injected into a second copy of the model and run one sequence at a
time with ``lorakit.use_adapters`` (and a float64 formula at the layer level).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.serve import AdapterBank, BankFullError, group_rows, prepare_for_serving, routed
from lorakit.serve.bank import AdapterInUseError
from lorakit.serve.row_groups import GRID_OVERHEAD_BYTES
from lorakit.state import lora_layers
from tests import tiny_models
from tests.locks import lock_is_free_for_others
from tests.tiny_models import adapter_tensors

ADAPTER_SPECS = [  # different ranks, alphas, targets, patterns, rsLoRA
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=8, target_modules="all-linear"),
    dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], rank_pattern={"down_proj": 6}),
    dict(r=3, lora_alpha=5, target_modules=["k_proj", "up_proj"], alpha_pattern={"up_proj": 11}),
    dict(r=8, lora_alpha=2, target_modules=["gate_proj", "q_proj"]),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_model():
    model = tiny_models.llama()
    for index, spec in enumerate(ADAPTER_SPECS):
        lorakit.inject(model, lorakit.LoraConfig(**spec), adapter_name=f"a{index}")
    tiny_models.randomize_adapters(model, std=0.1)
    return model


def served(reference, capacity=6, max_rank=8):
    model = tiny_models.llama()
    prepare_for_serving(model, "all-linear")
    bank = AdapterBank(model, max_rank=max_rank, capacity=capacity)
    return model, bank


@pytest.fixture(scope="module")
def setup():
    reference = reference_model()
    model, bank = served(reference)
    for index in range(len(ADAPTER_SPECS)):
        bank.load_from_model(f"a{index}", reference, f"a{index}")
    return reference, model, bank


def choices(kind: str, batch: int, count: int) -> list[int]:
    """Per-sequence adapter index (-1: none), drawn like punica's distributions."""
    generator = torch.Generator().manual_seed(7)
    if kind == "identical":
        return [1] * batch
    if kind == "uniform":
        return torch.randint(-1, count, (batch,), generator=generator).tolist()
    if kind == "distinct":  # every row its own adapter
        if batch > count:
            raise ValueError(f"{batch} rows cannot have distinct adapters out of {count}")
        return list(range(batch))
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, count + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(weights, batch, replacement=True, generator=generator).tolist()
    if kind == "skewed":  # most rows one adapter, a few others and some with none
        return [2] * (batch - 3) + [-1, 5, 0]
    if kind == "far-apart":  # two slots far apart: the padded op gathers their A and B
        return [(0, count - 1)[i % 2] for i in range(batch)]
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["identical", "uniform", "distinct", "zipf", "skewed", "far-apart"]
)
@pytest.mark.parametrize("mode", [None, "loop", "padded"])
def test_mixed_batch_equals_each_request_alone(setup, kind, mode):
    reference, model, bank = setup
    batch, length = (len(ADAPTER_SPECS) if kind == "distinct" else 8), 6
    ids = tiny_models.input_ids(batch, length)
    picks = choices(kind, batch, len(ADAPTER_SPECS))
    if kind == "distinct":
        assert sorted(picks) == list(range(len(ADAPTER_SPECS)))
    slots = torch.tensor([bank.slot_of(f"a{p}") if p >= 0 else -1 for p in picks])
    with routed(bank, slots[:, None].expand(batch, length), mode=mode):
        mixed = model(ids).logits
    for row, pick in enumerate(picks):
        names = [f"a{pick}"] if pick >= 0 else []
        with torch.no_grad(), lorakit.use_adapters(reference, names):
            alone = reference(ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=1e-5)
    if kind != "identical":  # the adapters must matter, or the test could not fail
        with torch.no_grad():
            base = model(ids).logits
        assert (mixed - base).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["loop", "padded"])
def test_per_token_rows_match_float64_formula(setup, mode):
    reference, model, bank = setup
    name, layer = next(
        (n, lay) for n, lay in lora_layers(model) if n.endswith("layers.0.mlp.up_proj")
    )
    ref_layer = dict(lora_layers(reference))[name]
    x = torch.randn(3, 7, layer.in_features)
    token_slots = torch.randint(
        -1, len(ADAPTER_SPECS), (3, 7), generator=torch.Generator().manual_seed(1)
    )
    with routed(bank, token_slots, mode=mode):
        got = layer(x)
    expected = ref_layer.base_layer(x).double()
    used = set()
    for index, slot in enumerate(token_slots.reshape(-1).tolist()):
        if slot < 0:
            continue
        adapter = bank.names()[[bank.slot_of(n) for n in bank.names()].index(slot)]
        if adapter in ref_layer.ranks:
            used.add(adapter)
            A, B = (p.double() for p in ref_layer.adapter_parameters(adapter))
            spec = ADAPTER_SPECS[int(adapter.removeprefix("a"))]
            assert A.shape[0] == rank_for(spec, name)
            row = x.reshape(-1, x.shape[-1])[index].double()
            expected.view(-1, expected.shape[-1])[index] += spec_scaling(spec, name) * (
                B @ (A @ row)
            )
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    # the rows use the three adapters of this layer, with three different scalings
    assert used == {"a1", "a2", "a4"} and -1 in token_slots
    assert sorted(spec_scaling(ADAPTER_SPECS[i], name) for i in (1, 2, 4)) == [1.0, 11 / 3, 8.0]


def rank_for(spec: dict, layer_name: str) -> int:
    """r, or the rank_pattern entry whose key ends the layer's name."""
    pattern = spec.get("rank_pattern", {})
    return next((r for key, r in pattern.items() if layer_name.endswith(key)), spec["r"])


def spec_scaling(spec: dict, layer_name: str) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA, from the spec (alpha_pattern, rank_pattern)."""
    pattern = spec.get("alpha_pattern", {})
    alpha = next((a for key, a in pattern.items() if layer_name.endswith(key)), spec["lora_alpha"])
    rank = rank_for(spec, layer_name)
    return alpha / math.sqrt(rank) if spec.get("use_rslora") else alpha / rank


def test_plan_groups_contiguous_rows_as_slices_and_others_as_indices():
    pages = {
        0: torch.tensor([4]),
        1: torch.tensor([0, 1]),
        2: torch.tensor([2]),
        3: torch.tensor([3, 6, 5]),
        5: torch.tensor([7]),
        7: torch.tensor([8]),
    }
    plan = group_rows([3, 3, -1, 1, 3], pages, mode="loop")
    by_slot = {segment.slot: segment for segment in plan.looped}
    assert set(by_slot) == {1, 3} and plan.num_rows == 5 and plan.padded() == ()
    assert by_slot[1].rows == slice(3, 4) and by_slot[1].pages.tolist() == [0, 1]
    assert by_slot[3].rows.tolist() == [0, 1, 4] and by_slot[3].pages.tolist() == [3, 6, 5]
    assert by_slot[1].first_page == 0 and by_slot[3].first_page is None  # [3, 6, 5]: gathered
    # short segments: a grid per length bucket, one entry per page (block 1: slot 1 holds 2
    # pages, slot 5 starts at page 7); one-row segments apart from the two-row one
    short = group_rows([0, 1, 0, 5, -1], pages)
    one_row, two_rows = short.padded()
    assert (one_row.length, one_row.block, one_row.window_run) == (1, 1, None)  # 0, 1, 7: gathered
    assert one_row.windows.tolist() == [0, 1, 7] and one_row.entry_slots.tolist() == [1, 1, 5]
    assert one_row.gather_rows.tolist() == [1, 1, 3] and one_row.valid is None
    assert one_row.dest_rows.tolist() == [1, 1, 3]  # row 1 gets both pages of slot 1
    assert (two_rows.length, two_rows.window_run) == (2, slice(4, 5))  # slot 0: page 4, in place
    assert two_rows.gather_rows.tolist() == [0, 2] and two_rows.dest_rows.tolist() == [0, 2]
    # a layer that only slots 0 and 5 adapt reads only their pages; its grids are kept
    layer = short.padded({0, 5, 9})
    assert [grid.entry_slots.tolist() for grid in layer] == [[5], [0]]
    assert short.padded({5, 0}) is layer and short.padded(set()) == ()
    # buckets share a grid where padding the shorter one's 3 entries by a row costs less than a
    # grid: small rows (one grid, every segment padded to 2 rows) but not large ones
    (merged,) = short.padded(row_bytes=GRID_OVERHEAD_BYTES // 3 - 1)
    assert merged.length == 2 and sorted(merged.dest_rows.tolist()) == [0, 1, 1, 2, 3]
    assert len(short.padded(row_bytes=GRID_OVERHEAD_BYTES // 3 + 1)) == 2
    padded = group_rows([0, 1, 0, 5, 2], pages, mode="padded").padded()[1]  # slot 0's bucket
    assert padded.length == 2 and padded.valid is None
    long_and_short = group_rows([7] * 20 + [1, 2], pages)  # a long segment loops, short ones pad
    assert [s.slot for s in long_and_short.looped] == [7]
    assert [grid.length for grid in long_and_short.padded()] == [1]
    with pytest.raises(KeyError, match=r"slots \[9\] hold no adapter"):
        group_rows([9, 0], pages)


def test_lru_eviction_pinning_and_in_use():
    reference = reference_model()
    _, bank = served(reference, capacity=2)
    bank.load_from_model("a0", reference, "a0", pin=True)
    bank.load_from_model("a1", reference, "a1")
    bank.load_from_model("a2", reference, "a2")  # evicts a1 (a0 pinned)
    assert bank.names() == ["a0", "a2"]
    bank.acquire("a2")
    with pytest.raises(BankFullError, match="pinned or used"):
        bank.load_from_model("a3", reference, "a3")
    with pytest.raises(AdapterInUseError):
        bank.evict("a2")
    bank.release("a2")
    bank.unpin("a0")
    bank.acquire("a2")
    bank.release("a2")  # a2 now most recently used: a0 goes
    bank.load_from_model("a3", reference, "a3")
    assert sorted(bank.names()) == ["a2", "a3"]


def test_reused_slot_is_exact_after_a_larger_adapter(setup):
    reference = setup[0]
    model, bank = served(reference, capacity=1)
    bank.load_from_model("big", reference, "a1")  # r=8 everywhere
    bank.evict("big")
    bank.load_from_model("small", reference, "a0")  # r=2 on q, v: padding must be zero again
    ids = tiny_models.input_ids(1, 5)
    with routed(bank, torch.zeros(1, 5, dtype=torch.long)):
        got = model(ids).logits
    with torch.no_grad(), lorakit.use_adapters(reference, ["a0"]):
        torch.testing.assert_close(got, reference(ids).logits, rtol=0, atol=1e-5)


def test_memory_budget_bounds_the_bank_and_errors_are_clear(setup):
    reference = setup[0]
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj", "v_proj"])
    probe = AdapterBank(model, max_rank=4, capacity=1)
    budget = int(probe.slot_bytes * 3.5)  # 3.5 adapters of rank 4, one page each
    bank = AdapterBank(model, max_rank=4, memory_budget=budget)
    assert bank.pages == 3 and bank.capacity == 3 and bank.memory_bytes() <= budget
    with pytest.raises(AdapterFileError, match="not prepared"):
        bank.load_from_model("x", reference, "a3")  # targets o_proj, down_proj
    with pytest.raises(AdapterFileError, match="max_rank"):
        bank.load_from_model("x", reference, "a5")  # r=8 > 4
    with pytest.raises(ValueError, match="holds no adapter"):
        AdapterBank(model, max_rank=4, memory_budget=10)
    assert bank.names() == []  # failed loads leave nothing behind


def test_concurrent_loads_and_evictions_keep_the_bank_consistent(setup):
    reference = setup[0]
    _, bank = served(reference, capacity=3)
    errors = []

    def worker(index):
        try:
            for round_ in range(5):
                name = f"w{index}-{round_}"
                slot = bank.load_from_model(name, reference, f"a{index % 3}")
                assert 0 <= slot < 3  # (another thread may already have evicted it)
        except BankFullError:
            pass
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    slots = [bank.slot_of(n) for n in bank.names()]
    assert len(slots) == len(set(slots)) == 3


def test_acquire_with_a_loader_loads_and_holds_atomically(setup):
    reference = setup[0]
    _, bank = served(reference, capacity=1)
    calls = []

    def loader(name):
        calls.append(name)
        return reference.lorakit_state.configs["a0"], adapter_tensors(reference, "a0")

    slot = bank.acquire("x", loader)
    assert bank.acquire("x", loader) == slot and calls == ["x"]  # loaded once
    with pytest.raises(BankFullError):
        bank.acquire("y", loader)  # the only slot is held by running requests
    assert calls == ["x"]  # ... so y's files were not even read
    bank.release("x")
    bank.release("x")
    assert bank.acquire("y", loader) == slot and bank.names() == ["y"]
    assert calls == ["x", "y"] and bank.evictions == 1
    bank.release("y")
    # preparing an adapter (what the HTTP threads do) never holds its slot: once it held it for
    # an instant, and the engine, seeing every slot busy with nothing running, failed a request
    assert bank.ensure_loaded("x", loader) == slot and bank.names() == ["x"]
    assert bank.acquire("y", loader) == slot and bank.names() == ["y"]


def test_the_loader_runs_outside_the_bank_lock_and_forget_cancels_its_load(setup):
    reference = setup[0]
    _, bank = served(reference, capacity=2)
    bank.load_from_model("other", reference, "a1")
    seen = []

    def loader(name):
        seen.append(lock_is_free_for_others(bank.lock))  # the engine could use the bank now
        if name == "unloaded-meanwhile":
            bank.forget(name)  # an unload arrives while the files are being read
        return reference.lorakit_state.configs["a0"], adapter_tensors(reference, "a0")

    slot = bank.ensure_loaded("x", loader)
    assert seen == [True] and bank.names() == ["other", "x"] and bank.slot_of("x") == slot
    with pytest.raises(KeyError, match="unloaded while it was being read"):
        bank.acquire("unloaded-meanwhile", loader)
    assert seen == [True, True] and bank.names() == [
        "other",
        "x",
    ]  # nothing loaded, held or evicted
    bank.acquire("other")
    with pytest.raises(AdapterInUseError):
        bank.forget("other")
    assert "other" in bank  # forget refused: nothing changed
    bank.release("other")
    bank.forget("other")
    assert bank.names() == ["x"]


def test_an_adapter_re_added_while_a_request_read_it_serves_that_request(setup):
    """Unload then load again while a request's lazy load is reading the files: the request
    uses the re-added adapter instead of failing as if it were still unloaded."""
    reference = setup[0]
    _, bank = served(reference, capacity=2)
    config, tensors = reference.lorakit_state.configs["a0"], adapter_tensors(reference, "a0")

    def loader(name):
        bank.forget(name)  # unloaded ...
        bank.load(name, config, tensors)  # ... and added again, before this read finishes
        return config, tensors

    slot = bank.acquire("x", loader)
    assert bank.names() == ["x"] and bank.slot_of("x") == slot
    with pytest.raises(AdapterInUseError):
        bank.evict("x")  # the request holds it
    bank.release("x")


@pytest.mark.parametrize(
    ("role", "bad_tensor", "shape"),
    [
        ("lora_A", torch.tensor(1.0), "()"),
        ("lora_A", torch.ones(64), "(64,)"),
        ("lora_B", torch.ones(64, 2, 1), "(64, 2, 1)"),
        ("lora_A", torch.ones(0, 64), "(0, 64)"),  # rank 0: the scaling alpha / r would divide by 0
    ],
)
def test_a_factor_that_is_not_a_matrix_is_refused_naming_the_tensor(role, bad_tensor, shape):
    model = tiny_models.llama()
    prepare_for_serving(model, ["q_proj"])
    bank = AdapterBank(model, max_rank=4, capacity=1)
    path = "model.layers.0.self_attn.q_proj"
    tensors = {
        f"base_model.model.{path}.lora_A.weight": torch.ones(2, 64),
        f"base_model.model.{path}.lora_B.weight": torch.ones(64, 2),
    }
    tensors[f"base_model.model.{path}.{role}.weight"] = bad_tensor
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(AdapterFileError) as caught:
        bank.load("bad", config, tensors)
    assert f"tensor {path}.{role}.weight has shape {shape}" in str(caught.value)
    assert bank.names() == []
