"""experiments/said_study.py: resumable rows and the lr chosen on validation, not on test."""

from __future__ import annotations

import pytest

from tests.experiment_scripts import imported

SCRIPT_MODULES = ("common", "said_study")  # benchmarks/ has a ``common`` module too


@pytest.fixture
def said_study(monkeypatch):
    """experiments/said_study.py (``tests.experiment_scripts``)."""
    yield from imported(monkeypatch, "said_study", SCRIPT_MODULES)


def test_rows_append_whole_and_a_torn_last_line_is_skipped(said_study, tmp_path):
    path = tmp_path / "runs.jsonl"
    assert said_study.read_rows(path) == []
    said_study.append_row(path, {"key": "a", "x": 1})
    said_study.append_row(path, {"key": "b", "x": 2})
    with path.open("a") as stream:  # a process killed in the middle of a write
        stream.write('{"key": "c", "x"')
    assert said_study.read_rows(path) == [{"key": "a", "x": 1}, {"key": "b", "x": 2}]


def test_lr_is_chosen_per_dimension_on_mean_validation_accuracy(said_study):
    def row(d, lr, val, test):
        return {"dimension": d, "lr": lr, "val_accuracy": val, "test_accuracy": test}

    rows = [
        row(100, 1e-2, 0.80, 0.60),
        row(100, 1e-2, 0.78, 0.61),
        row(100, 1e-3, 0.70, 0.90),  # best on test, worse on validation: not chosen
        row(100, 1e-3, 0.71, 0.90),
        row(1000, 1e-3, 0.75, 0.70),
    ]
    chosen = said_study.best_lr(rows)
    assert [r["lr"] for r in chosen[100]] == [1e-2, 1e-2]
    assert [r["lr"] for r in chosen[1000]] == [1e-3]
    # an lr run on fewer seeds so far is not compared, however well its one seed did
    chosen = said_study.best_lr([*rows, row(100, 5e-2, 0.95, 0.95)])
    assert [r["lr"] for r in chosen[100]] == [1e-2, 1e-2]
