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
            state = generator.get_state()
            new.add(row_cache(argument, generator), argument)
            generator.set_state(state)
            old.add(row_cache(argument, generator), argument)
        elif operation == "step":
            for _ in range(argument):
                state = generator.get_state()
                mask, positions = decode_step(new, generator)
                generator.set_state(state)
                old_mask = torch.cat([old.mask, torch.ones(old.rows, 1, dtype=torch.long)], 1)
                decode_step(old, generator)
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
