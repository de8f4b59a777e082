"""The training batch plan: batches of similar length (far less padding than a plain shuffle),
every example once per epoch, deterministic per (seed, epoch), DDP ranks sharing the same
global batches as one process."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from lorakit.errors import UserError
from lorakit.train import BatchOrder, TrainingConfig, pad_collate, train
from tests.train_job import build_model, make_data


def _mixed_lengths(count: int = 1200, seed: int = 0) -> tuple[int, ...]:
    """Lengths like a real dataset: mostly short, a long tail (5..300 tokens)."""
    rng = random.Random(seed)
    return tuple(min(300, 5 + int(rng.expovariate(1 / 40))) for _ in range(count))


def _padding(lengths, batches) -> float:
    """Padding share computed here by hand: each batch padded to its longest example."""
    padded = real = 0
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        padded += longest * len(batch)
        real += sum(lengths[i] for i in batch)
    return (padded - real) / padded


def _epoch(plan: BatchOrder, epoch: int) -> list[list[int]]:
    steps = plan.steps_per_epoch
    return [plan.step_indices(step) for step in range(epoch * steps, (epoch + 1) * steps)]


def test_batches_by_length_pad_far_less_than_a_plain_shuffle():
    lengths = _mixed_lengths()
    shuffled = BatchOrder(len(lengths), batch_size=8, seed=1)
    by_length = BatchOrder(len(lengths), batch_size=8, seed=1, lengths=lengths)
    plain = _padding(lengths, _epoch(shuffled, 0))
    grouped = _padding(lengths, _epoch(by_length, 0))
    assert plain > 0.5  # a random batch of 8 usually holds one long example (measured 0.61)
    assert grouped < 0.15 * plain  # measured 0.054
    from lorakit.train.batches import padding_fraction

    assert padding_fraction(lengths, _epoch(by_length, 0)) == pytest.approx(grouped)


def test_the_order_of_batches_is_random_not_short_to_long():
    lengths = _mixed_lengths()
    plan = BatchOrder(len(lengths), batch_size=8, seed=1, lengths=lengths, bucket_batches=10)
    longest = [max(lengths[i] for i in batch) for batch in _epoch(plan, 0)]
    ups = sum(b > a for a, b in itertools.pairwise(longest))
    downs = sum(b < a for a, b in itertools.pairwise(longest))
    assert ups > 0.3 * len(longest) and downs > 0.3 * len(longest)
    # which examples meet changes between epochs: batches of epoch 0 are not those of epoch 1
    assert {tuple(sorted(b)) for b in _epoch(plan, 0)} != {
        tuple(sorted(b)) for b in _epoch(plan, 1)
    }


@pytest.mark.parametrize(
    ("count", "batch_size", "grad_accum", "world_size"),
    [(1200, 8, 1, 1), (1003, 4, 3, 1), (1003, 2, 2, 2), (20, 3, 1, 1)],
)
def test_every_example_once_per_epoch_and_each_rank_its_share(
    count, batch_size, grad_accum, world_size
):
    lengths = _mixed_lengths(count)
    global_batch = batch_size * grad_accum * world_size
    drop_last = world_size > 1
    plan = BatchOrder(
        count, batch_size, grad_accum, world_size, seed=7, lengths=lengths, drop_last=drop_last
    )
    for epoch in range(3):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        seen = []
        for step in steps:
            indices = plan.step_indices(step)
            shares = [plan.micro_batches(step, rank) for rank in range(world_size)]
            # the ranks' micro-batches together are exactly the global batch, each index once
            assert sorted(i for share in shares for micro in share for i in micro) == sorted(
                indices
            )
            assert all(len(share) == grad_accum for share in shares)
            seen += indices
        if drop_last:  # every full global batch once; the n % G left over are dropped
            assert len(seen) == len(set(seen)) == count - count % global_batch
        else:
            assert sorted(seen) == list(range(count))


def test_ranks_get_the_global_batches_of_one_process_with_the_same_global_batch():
    lengths = _mixed_lengths(1003)
    one = BatchOrder(1003, batch_size=4, seed=3, lengths=lengths)
    two = BatchOrder(1003, batch_size=2, world_size=2, seed=3, lengths=lengths, drop_last=True)
    assert two.steps_per_epoch == one.steps_per_epoch - 1  # 1003 % 4 = 3 left over, dropped
    for epoch in range(2):
        assert _epoch(two, epoch) == _epoch(one, epoch)[:-1]  # the short batch comes last
        assert len(_epoch(one, epoch)[-1]) == 3


def test_the_plan_depends_only_on_seed_and_epoch():
    lengths = _mixed_lengths(300)
    first = BatchOrder(300, 8, seed=5, lengths=lengths)
    again = BatchOrder(300, 8, seed=5, lengths=lengths)
    assert [again.step_indices(s) for s in range(90, 30, -1)] == [
        first.step_indices(s) for s in range(90, 30, -1)
    ]  # steps asked in any order (as after a resume) give the same batches
    other_seed = BatchOrder(300, 8, seed=6, lengths=lengths)
    assert _epoch(other_seed, 0) != _epoch(first, 0)
    # epoch e of seed s uses seed s + e: epoch 1 of seed 5 is epoch 0 of seed 6
    assert _epoch(first, 1) == _epoch(other_seed, 0)


def test_without_lengths_the_plan_is_the_plain_shuffle():
    plan = BatchOrder(10, batch_size=4, seed=2)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(2)).tolist()
    assert _epoch(plan, 0) == [order[0:4], order[4:8], order[8:10]]
    with pytest.raises(ValueError, match="3 lengths for 10 examples"):
        BatchOrder(10, batch_size=4, lengths=(1, 2, 3))


def test_the_loop_groups_by_length_and_a_resume_with_other_lengths_is_refused(tmp_path):
    """The loop takes its batches from the plan built on ``length_of``: the training collate
    sees exactly the planned index groups; resuming with other lengths (e.g. another max_length)
    is refused instead of silently training on other batches."""
    data = make_data(count=24)
    lengths = [len(example["input_ids"]) for example in data]
    seen = []

    def collate(items):
        seen.append(sorted(items))
        return pad_collate(0)([data[i] for i in items])

    config = TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        batch_size=8,
        progress=False,
        plot=False,
        checkpoint_every=3,
        seed=4,
    )
    train(build_model(0.0), range(24), collate, config, length_of=lambda i: lengths[i])
    plan = BatchOrder(24, 8, seed=4, lengths=tuple(lengths))
    assert seen == [sorted(plan.step_indices(step)) for step in range(3)]
    config.max_steps = 3
    with pytest.raises(
        UserError,
        match="other data, batch, optimizer or adapter settings: the examples' token lengths differ",
    ):
        train(
            build_model(0.0),
            range(24),
            collate,
            config,
            resume=True,
            length_of=lambda i: lengths[i] + (i == 0),
        )


def test_a_checkpoint_from_before_length_grouping_says_why_it_cannot_resume(tmp_path):
    data = make_data(count=24)
    collate = lambda items: pad_collate(0)([data[i] for i in items])  # noqa: E731
    config = TrainingConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        batch_size=8,
        progress=False,
        plot=False,
        checkpoint_every=2,
        seed=4,
    )
    train(build_model(0.0), range(24), collate, config)
    (state_file,) = tmp_path.glob("checkpoints/step-*/trainer_state.json")
    state = json.loads(state_file.read_text())
    del state["data_plan"]["batches"], state["data_plan"]["lengths_sha256"]  # an older layout
    state_file.write_text(json.dumps(state))
    config.max_steps = 3
    with pytest.raises(UserError, match="drew batches by plain shuffling"):
        train(build_model(0.0), range(24), collate, config, resume=True)
