"""Training review, session 29: an ``output_dir`` that is a file is refused before anything runs
(it used to fail with a bare ``FileExistsError`` after the first optimiser step had changed the
adapter)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import UserError
from lorakit.train import TrainingConfig, pad_collate, train
from tests import tiny_models


def test_an_output_dir_that_is_a_file_is_refused_before_the_first_step(tmp_path):
    model = tiny_models.llama()
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    target = tmp_path / "a-file"
    target.write_text("x")
    data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 4
    config = TrainingConfig(
        output_dir=str(target), batch_size=2, max_steps=2, progress=False, plot=False
    )
    with pytest.raises(UserError, match="a-file is a file"):
        train(model, data, pad_collate(0), config)
    after = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert target.read_text() == "x"


class _Tokenized(list):
    """Stands for a tokenized split: its examples and how many ``max_length`` shortened."""

    def __init__(self, size: int, truncated: int) -> None:
        super().__init__(range(size))
        self.num_truncated = truncated


def test_the_truncation_warning_says_evaluate_for_evaluation_data(capsys):
    """Evaluation examples are evaluated, not trained on (the warning said 'to train on them')."""
    from lorakit.train.run import _announce

    model = tiny_models.llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    tokenized = {"train": _Tokenized(8, 2), "eval": _Tokenized(5, 1)}
    _announce(model, tokenized, TrainingConfig(batch_size=4, max_steps=2), max_length=64)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("were shortened; raise --max-length to train on them whole")
    assert lines[1].startswith("lorakit: warning: 1 of 5 evaluation examples")
    assert lines[1].endswith("were shortened; raise --max-length to evaluate them whole")


def test_a_jsonl_file_of_blank_lines_is_not_called_empty(tmp_path):
    from lorakit.data.formats import read_jsonl

    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(UserError, match="empty or holds only blank lines"):
        read_jsonl(blank)
