"""The engine's preallocated batched KV cache against the concatenating one it replaced: the same
keys, values, mask and positions through joins, decode steps, leaves and buffer growth."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lorakit.serve import kv
from lorakit.serve.kv import BatchedCache, ConcatenatedCache, WindowLayer

LAYERS, HEADS, HEAD_DIM = 2, 3, 4


def row_cache(length: int, generator: torch.Generator) -> DynamicCache:
    """A batch-1 DynamicCache holding ``length`` random tokens in every layer."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        keys = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
        cache.update(keys, torch.randn(1, HEADS, length, HEAD_DIM, generator=generator), layer)
    return cache


def decode_step(cache, generator: torch.Generator):
    """What one decode step does to the cache: inputs, one column per layer, advance."""
    is_new = isinstance(cache, BatchedCache)
    mask, positions = cache.step_inputs() if is_new else (None, None)
    for layer in cache.cache.layers:
        new = torch.randn(cache.rows, HEADS, 1, HEAD_DIM, generator=generator)
        layer.update(new, new * 2)
    if is_new:
        cache.advance()
    else:  # the old engine: the mask and lengths grow by one column
        cache.mask = torch.cat([cache.mask, torch.ones(cache.rows, 1, dtype=torch.long)], 1)
        cache.lengths = cache.lengths + 1
    return mask, positions


def join_both(new: BatchedCache, old: ConcatenatedCache, length: int, generator) -> None:
    """A row of ``length`` positions joins both caches, with the same random keys and values."""
    state = generator.get_state()
    new.add(row_cache(length, generator), length)
    generator.set_state(state)
    old.add(row_cache(length, generator), length)


def step_both(new: BatchedCache, old: ConcatenatedCache, generator):
    """One decode step of both caches with the same random keys and values; returns the
    preallocated cache's ``(mask, positions)``."""
    state = generator.get_state()
    stepped = decode_step(new, generator)
    generator.set_state(state)
    decode_step(old, generator)
    return stepped


def assert_same(new: BatchedCache, old: ConcatenatedCache) -> None:
    assert torch.equal(new.mask, old.mask)
    assert torch.equal(new.lengths, old.lengths)
    for fast, slow in zip(new.cache.layers, old.cache.layers, strict=True):
        assert torch.equal(fast.keys, slow.keys)
        assert torch.equal(fast.values, slow.values)


# (operation, argument): join a row of that length, run that many decode steps, keep those rows
SCRIPT = [
    ("join", 5),
    ("step", 2),
    ("join", 9),
    ("join", 3),
    ("step", 3),
    ("keep", [2, 0]),
    ("step", 1),
    ("join", 20),
    ("step", 4),
    ("keep", [1, 2]),
    ("keep", [1]),
    ("step", 2),
    ("keep", []),
    ("join", 4),
    ("join", 4),
    ("step", 70),
    ("join", 2),
    ("step", 1),
]


@pytest.mark.parametrize("headroom", [0, 64])
def test_preallocated_cache_equals_the_concatenating_cache_through_joins_steps_and_leaves(
    monkeypatch, headroom
):
    monkeypatch.setattr(kv, "TIME_HEADROOM", headroom)  # 0: the buffers grow at every chance
    generator = torch.Generator().manual_seed(0)
    new, old = BatchedCache(), ConcatenatedCache()
    for operation, argument in SCRIPT:
        if operation == "join":
            join_both(new, old, argument, generator)
        elif operation == "step":
            for _ in range(argument):
                old_mask = torch.cat([old.mask, torch.ones(old.rows, 1, dtype=torch.long)], 1)
                mask, positions = step_both(new, old, generator)
                assert torch.equal(mask, old_mask)
                assert torch.equal(positions[:, 0], old.lengths - 1)
        else:
            new.keep(argument)
            old.keep(argument)
        if old.rows:
            assert_same(new, old)
            assert all(isinstance(layer, WindowLayer) for layer in new.cache.layers)
        assert new.rows == old.rows


def test_a_decode_step_writes_in_place_without_reallocating():
    generator = torch.Generator().manual_seed(1)
    cache = BatchedCache()
    cache.add(row_cache(6, generator), 6)
    cache.add(row_cache(3, generator), 3)
    cache.step_inputs()  # reserves the column
    buffers = [layer.key_buffer.data_ptr() for layer in cache.cache.layers]
    for _ in range(10):
        decode_step(cache, generator)
    assert [layer.key_buffer.data_ptr() for layer in cache.cache.layers] == buffers
    assert cache.cache.layers[0].keys.shape == (2, HEADS, 16, HEAD_DIM)
    # the shorter row's left padding is zeros (finite under the mask)
    assert torch.equal(cache.cache.layers[0].keys[1, :, :3], torch.zeros(HEADS, 3, HEAD_DIM))


def test_a_long_run_of_short_requests_keeps_the_buffers_small():
    """Rows join, decode and leave for many steps while at most two run: the buffers' row
    capacity stays at the most rows ever held and the time capacity near the longest window.
    (A reallocation for time used to grow the rows by half again each time: a server's KV
    buffers grew without bound, 27,310 rows for 2 running requests after a minute.)"""
    generator = torch.Generator().manual_seed(3)
    cache = BatchedCache()
    for request in range(60):
        cache.add(row_cache(4 + request % 5, generator), 4 + request % 5)
        for _ in range(7):
            decode_step(cache, generator)
        if cache.rows == 2:
            cache.keep([1])  # the older request finishes
    rows_cap, _, time_cap, _ = cache.cache.layers[0].key_buffer.shape
    assert rows_cap == 2
    assert time_cap <= 2 * (8 + 2 * 7) + kv.TIME_HEADROOM


def buffer_shape(cache: BatchedCache) -> tuple[int, ...] | None:
    """(rows_cap, heads, time_cap, head_dim) of the cache's buffers; None when it holds none."""
    return None if cache.cache is None else tuple(cache.cache.layers[0].key_buffer.shape)


def test_row_capacity_stops_at_max_rows_and_an_emptied_cache_gives_its_buffers_back():
    """Rows joining one by one grew the buffers by half again past the engine's max_batch
    (1, 2, 3, 4, 6 rows for 5), and ``keep([])`` kept them for good: an idle engine held the
    buffers of its largest burst. Now the rows stop at ``max_rows``, the buffers go when the
    last row leaves, and the next join allocates for itself alone (same keys and values)."""
    generator = torch.Generator().manual_seed(4)
    new, old = BatchedCache(max_rows=5), ConcatenatedCache()
    capacities = []
    for length in (30, 12, 41, 7, 25):
        join_both(new, old, length, generator)
        capacities.append(buffer_shape(new)[0])
        for _ in range(3):
            step_both(new, old, generator)
        assert_same(new, old)
    assert capacities == [1, 2, 3, 4, 5]
    new.keep([])
    old.keep([])
    assert new.cache is None and buffer_shape(new) is None and new.rows == 0 == new.width
    join_both(new, old, 3, generator)
    assert buffer_shape(new) == (1, HEADS, 3 + 1 + kv.TIME_HEADROOM, HEAD_DIM)
    for _ in range(2):
        step_both(new, old, generator)
    assert_same(new, old)


def test_max_rows_below_one_is_refused():
    with pytest.raises(ValueError, match="max_rows must be >= 1 or None, got 0"):
        BatchedCache(max_rows=0)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_a_sliding_window_model_is_served_past_its_window_as_alone(family):
    """Prefills start from ``full_attention_cache``: rows of other lengths join and decode past
    the window (5) with the tokens of a full recompute (the sliding cache layers failed the
    batch: they count the positions they dropped, which joins break)."""
    import threading

    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    import lorakit
    from lorakit.serve import AdapterBank, prepare_for_serving
    from lorakit.serve.engine import Engine
    from lorakit.serve.sampling import SamplingParams
    from tests import tiny_models

    def build():
        torch.manual_seed(0)
        if family == "mistral":
            return MistralForCausalLM(MistralConfig(**tiny_models.DECODER_SIZES, sliding_window=5))
        config = Qwen2Config(
            **tiny_models.DECODER_SIZES,
            sliding_window=5,
            use_sliding_window=True,
            max_window_layers=1,
        )
        assert "sliding_attention" in config.layer_types
        return Qwen2ForCausalLM(config)

    reference = build().eval()
    lorakit.inject(reference, lorakit.LoraConfig(r=4, target_modules="all-linear"), "a0")
    tiny_models.randomize_adapters(reference, std=0.3)
    model = build().eval()
    prepare_for_serving(model)
    bank = AdapterBank(model, max_rank=4, capacity=1)
    bank.load_from_model("a0", reference, "a0")
    engine = Engine(model, bank, max_batch=4, eos_token_ids=[])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2], [1, 2], [3, 4, 5]]
    got, done = {}, threading.Semaphore(0)
    for index, prompt in enumerate(prompts):

        def collect(event, index=index):
            got.setdefault(index, []).extend(event.token_ids)
            if event.finish_reason is not None:
                got[index, "end"] = event.finish_reason
                done.release()

        engine.submit(prompt, "a0", SamplingParams(max_tokens=9), collect)
    with engine:
        for _ in prompts:
            assert done.acquire(timeout=60)
    for index, prompt in enumerate(prompts):
        ids = list(prompt)
        with torch.no_grad(), lorakit.use_adapters(reference, ["a0"]):
            for _ in range(9):  # greedy, the whole sequence each time: no cache at all
                ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
        assert got[index, "end"] == "length"
        assert got[index] == ids[len(prompt) :], index
