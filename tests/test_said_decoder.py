"""experiments/said_decoder.py (and the loop it shares with said_study.py), without SmolLM2: the
splits and the plan, early stopping, and SAID behind the causal LM's forward arguments."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests.experiment_scripts import imported

SCRIPT_MODULES = (  # benchmarks/ has a ``common`` module too
    "common",
    "said_study",
    "said_decoder",
    "smollm2_rank",
    "smollm2_report",
    "smollm2_settings",
    "full_finetune_spectrum",
)


@pytest.fixture
def said_decoder(monkeypatch):
    """experiments/said_decoder.py (``tests.experiment_scripts``)."""
    yield from imported(monkeypatch, "said_decoder", SCRIPT_MODULES)


def test_validation_is_carved_from_the_end_of_the_training_reviews(said_decoder):
    reviews = list(range(1000))
    train, val = said_decoder.split_reviews(reviews, 200, None)
    assert val == list(range(800, 1000)) and train == list(range(800))
    train, val = said_decoder.split_reviews(reviews, 200, 240)
    assert train == list(range(240)) and val == list(range(800, 1000))  # smollm2_rank's 240 first
    with pytest.raises(ValueError):
        said_decoder.split_reviews(reviews, 1000, None)


def test_plan_runs_the_frozen_model_once_and_keys_are_unique(said_decoder):
    args = said_decoder.arguments(["--dims", "10000", "1000", "--lrs", "1e-2", "--seeds", "0", "1"])
    jobs = said_decoder.plan(args)
    assert jobs[0] == ("frozen", 0, 0.0, 0)
    assert [j[0] for j in jobs].count("frozen") == 1
    assert [j[1] for j in jobs if j[0] == "said"] == [1000, 1000, 10000, 10000]
    keys = [said_decoder.said_study.key(*job, args.head) for job in jobs]
    assert len(set(keys)) == len(keys)
    args = said_decoder.arguments(["--methods", "said", "--dims", "1000", "--seeds", "0"])
    assert {j[0] for j in said_decoder.plan(args)} == {"said"}


def test_early_stopping_restores_the_best_validation_state(said_decoder):
    weight = torch.zeros(1)
    vals = iter([0.5, 0.6, 0.8, 0.7, 0.7, 0.9])  # before step 1, then every 2 steps

    def step(number):
        weight.fill_(number)

    args = argparse.Namespace(max_steps=100, eval_every=2, patience=2)
    record = said_decoder.said_study.early_stopping(
        step, lambda: next(vals), lambda: float(weight), [weight], args
    )
    assert record["best_step"] == 4 and record["steps"] == 8 and record["val_accuracy"] == 0.8
    assert record["test_accuracy"] == 4.0  # scored on the restored state
    assert [s for s, _ in record["val_curve"]] == [0, 2, 4, 6, 8]
    args.max_steps = 0  # the frozen model: one validation, no step
    record = said_decoder.said_study.early_stopping(None, lambda: 0.7, lambda: 0.6, [], args)
    assert (record["steps"], record["val_curve"], record["test_accuracy"]) == (0, [(0, 0.7)], 0.6)


def test_said_behind_the_models_forward_arguments(said_decoder, tiny_llama):
    names = said_decoder.theta_names(tiny_llama)
    assert "model.embed_tokens.weight" not in names and "model.norm.weight" in names
    said = said_decoder.IntrinsicDimension(tiny_llama, 16, names, said=True, seed=0)
    forward = said_decoder.SubspaceLM(said)
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, positions from 0 as data.classify passes them
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        expected = tiny_llama(**inputs).logits
        assert torch.allclose(forward(**inputs).logits, expected, atol=1e-6)  # θ_d = 0
        said.theta_d.normal_()
        live = forward(**inputs, logits_to_keep=1).logits
        with forward.fixed():
            assert torch.allclose(forward(**inputs, logits_to_keep=1).logits, live, atol=1e-6)
    assert live.shape == (2, 1, 128) and not torch.allclose(live, expected[:, -1:])
    forward(**inputs).logits.sum().backward()
    trained = [n for n, p in forward.named_parameters() if p.grad is not None]
    assert sorted(trained) == ["said.scales", "said.theta_d"]


def test_a_finished_run_is_written_as_a_row(said_decoder, tmp_path):
    """said_study.train_all wrote its rows with ``args.task``, which said_decoder's arguments
    lacked: a 55-minute run was computed and then lost at the write."""
    argv = ["--methods", "said", "--dims", "1000", "--lrs", "2e-2", "--seeds", "0"]
    args = said_decoder.arguments(argv)
    path = tmp_path / "rows.jsonl"
    record = dict(test_accuracy=0.8, val_accuracy=0.82, best_step=50, steps=100, seconds=1.0)
    said_decoder.said_study.train_all(args, path, said_decoder.plan(args), lambda *job: record)
    (row,) = said_decoder.said_study.read_rows(path)
    assert row["key"] == said_decoder.said_study.key("said", 1000, args.lrs[0], 0, args.head)
    assert row["test_accuracy"] == 0.8 and row["task"] == "rotten_tomatoes"
