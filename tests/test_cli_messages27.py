"""Messages from the docs review: each names the flag (and the value) that is wrong, and lists
only what the command takes."""

from __future__ import annotations

import pytest

import lorakit
from lorakit.cli import main
from lorakit.errors import UserError
from tests import tiny_models


def test_train_gguf_without_a_gguf_file_lists_what_train_takes(model_dir, capsys):
    command = ["train", "--model", str(model_dir), "--data", "rotten-tomatoes"]
    assert main([*command, "--quantization", "gguf", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "this model has no GGUF file. Choose another: nf4, fp4, int8\n" in err
    assert "int4-groups" not in err  # (train refuses it: inference only)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--max-length", "1", "--max-length must be >= 2, got 1"),
    ],
)
def test_eval_names_the_flag_that_is_wrong(model_dir, capsys, flag, value, expected):
    assert main(["eval", "--model", str(model_dir), "--data", "rotten-tomatoes", flag, value]) == 2
    assert expected in capsys.readouterr().err


def test_a_rank_for_cat_names_the_method_not_the_value():
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "a"
    )
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "b")
    with pytest.raises(UserError) as caught:
        lorakit.combine(["a", "b"], method="cat", rank=4, model=model)
    message = str(caught.value)
    assert "not cat (cat's rank is the sum of the adapters' ranks)" in message
    assert "positive integer" not in message and "svd" in message
