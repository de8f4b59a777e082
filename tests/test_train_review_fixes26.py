"""Training fixes of review 26: --resume on other data of the same lengths (a digest of the
examples' tokens and labels in the checkpoint), other --target-modules named without a
misleading fingerprint warning, errors naming flags instead of fields, CSV remedies a command
line user can follow, and fractional --epochs counted up as transformers.Trainer counts them."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import data
from lorakit.errors import UserError
from lorakit.models import load_model
from lorakit.train import TrainingConfig, pad_collate, train
from lorakit.train.config import flag_name
from lorakit.train.resume import check_resumable
from lorakit.train.settings import TrainSettings, option_fields
from tests import tiny_models
from tests.cli_runs import train_cli
from tests.train_job import make_data

TARGETS = ["q_proj", "v_proj"]


def _model(targets=TARGETS) -> torch.nn.Module:
    """The tiny Llama with a LoRA adapter on ``targets`` (A drawn from seed 11)."""
    model = tiny_models.llama()
    torch.manual_seed(11)
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def _config(output: Path, **overrides) -> TrainingConfig:
    settings = dict(output_dir=str(output), max_steps=4, batch_size=4, progress=False, plot=False)
    return TrainingConfig(**{**settings, **overrides})


def _interrupted(output: Path, examples, model=None) -> None:
    """A 4-step run with checkpoints at steps 2 and 4, the last one removed: killed after 2."""
    config = _config(output, checkpoint_every=2)
    train(model if model is not None else _model(), examples, pad_collate(0), config)
    shutil.rmtree(output / "checkpoints" / "step-00000004")


def _resume(output: Path, examples, model=None):
    config = _config(output, checkpoint_every=2)
    model = model if model is not None else _model()
    return train(model, examples, pad_collate(0), config, resume=True)


def _digest(examples) -> str:
    """The expected digest, written out: sha256 over each example's ``len, input_ids, len,
    labels`` as little-endian int64, the first 16 hex digits."""
    digest = hashlib.sha256()
    for example in examples:
        for tokens in (example["input_ids"], example["labels"]):
            digest.update(struct.pack(f"<{len(tokens) + 1}q", len(tokens), *tokens))
    return digest.hexdigest()[:16]


def _same_lengths_other_tokens(examples):
    """``examples`` with every prompt token moved by one (30..127 -> 31..128): the same
    lengths and labels, other input_ids."""
    return [
        {
            "input_ids": [
                t + 1 if label == -100 and t >= 30 else t
                for t, label in zip(e["input_ids"], e["labels"], strict=True)
            ],
            "labels": list(e["labels"]),
        }
        for e in examples
    ]


def _state(output: Path, step: int = 2) -> Path:
    return output / "checkpoints" / f"step-{step:08d}" / "trainer_state.json"


# ---------------------------------------------------------------- 1. resume on other data
def test_checkpoint_records_the_digest_of_the_examples_tokens_and_labels(tmp_path):
    examples = make_data(16)
    _interrupted(tmp_path, examples)
    plan = json.loads(_state(tmp_path).read_text())["data_plan"]
    assert plan["examples_sha256"] == _digest(examples)
    assert _digest(_same_lengths_other_tokens(examples)) != _digest(examples)


def test_resume_on_other_data_of_the_same_lengths_is_refused_naming_the_flags(tmp_path):
    examples = make_data(16)
    _interrupted(tmp_path, examples)
    other = _same_lengths_other_tokens(examples)
    assert [len(e["input_ids"]) for e in other] == [len(e["input_ids"]) for e in examples]
    with pytest.raises(UserError) as error:
        _resume(tmp_path, other)
    message = str(error.value)
    assert (
        f"the training examples differ from the checkpoint's (sha256 of their tokens and labels "
        f"{_digest(other)}, the checkpoint's {_digest(examples)}): the training data "
        "(--data / --split) or --max-length is not the one the checkpoint was trained on"
    ) in message
    assert "lengths" not in message and "num examples" not in message
    assert not (tmp_path / "checkpoints" / "step-00000004").exists()  # nothing trained


def test_resume_on_other_labels_of_the_same_tokens_is_refused(tmp_path):
    examples = make_data(16)
    _interrupted(tmp_path, examples)
    flipped = [
        {"input_ids": e["input_ids"], "labels": [-100] * (len(e["labels"]) - 1) + [e["labels"][-1]]}
        for e in examples
    ]
    with pytest.raises(UserError, match=r"the training examples differ from the checkpoint's"):
        _resume(tmp_path, flipped)


def test_resume_on_the_same_data_ends_as_the_uninterrupted_run(tmp_path):
    examples = make_data(16)
    whole = _model()
    train(whole, examples, pad_collate(0), _config(tmp_path / "whole", checkpoint_every=2))
    _interrupted(tmp_path / "cut", examples)
    resumed = _model()
    result = _resume(tmp_path / "cut", examples, resumed)
    assert result.resumed_from == 2 and result.steps == 4
    expected = {k: v for k, v in whole.named_parameters() if v.requires_grad}
    for name, value in resumed.named_parameters():
        if value.requires_grad:
            assert torch.equal(value, expected[name]), name
    assert any(bool((v != 0).any()) for k, v in expected.items() if "lora_B" in k)


def test_an_older_checkpoint_without_the_digest_compares_the_lengths_in_words(tmp_path):
    """A checkpoint of an older lorakit (no ``examples_sha256``) resumes on data of the same
    lengths as before; other lengths are named by their flags, not as a lengths sha256."""
    examples = make_data(16)
    _interrupted(tmp_path, examples)
    state_path = _state(tmp_path)
    state = json.loads(state_path.read_text())
    del state["data_plan"]["examples_sha256"]
    state_path.write_text(json.dumps(state))
    longer = [{"input_ids": [7, *e["input_ids"]], "labels": [-100, *e["labels"]]} for e in examples]
    with pytest.raises(UserError) as error:
        _resume(tmp_path, longer)
    message = str(error.value)
    assert (
        "the examples' token lengths differ from the checkpoint's: the training data "
        "(--data / --split) or --max-length is not the one the checkpoint was trained on"
    ) in message
    assert "sha256" not in message
    result = _resume(tmp_path, _same_lengths_other_tokens(examples))  # (as before: not known)
    assert result.resumed_from == 2 and result.steps == 4


def test_cli_resume_on_other_data_of_the_same_lengths_is_refused(tmp_path, capsys, model_dir):
    lines = [
        {"prompt": f"Review: {word} film\nSentiment:", "completion": f" {answer}"}
        for word, answer in [("good", "positive"), ("dull", "negative")] * 4
    ]
    ours, gold = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ours.write_text("".join(json.dumps(line) + "\n" for line in lines))
    gold.write_text(ours.read_text().replace("good", "gold"))  # 4 tokens each
    _, tokenizer = load_model(str(model_dir), progress=False)
    lengths = [
        data.tokenize_examples(data.load_examples(p), tokenizer, 64).lengths for p in (ours, gold)
    ]
    assert lengths[0] == lengths[1]  # the case a lengths hash cannot see
    output = tmp_path / "run"
    settings = ["--steps", "4", "--batch-size", "2", "--r", "4", "--checkpoint-every", "2"]
    assert train_cli(model_dir, ours, output, *settings, "--max-length", "64") == 0
    shutil.rmtree(output / "checkpoints" / "step-00000004")
    capsys.readouterr()
    code = train_cli(model_dir, gold, output, *settings, "--max-length", "64", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "the training examples differ from the checkpoint's" in err
    assert "(--data / --split) or --max-length" in err
    assert json.loads((output / "train_settings.json").read_text())["data"] == str(ours)


# ---------------------------------------------------------------- 2. other --target-modules
def test_resume_with_other_targets_names_them_without_a_fingerprint_warning(tmp_path):
    examples = make_data(16)
    _interrupted(tmp_path, examples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old order warned about an unverified fingerprint
        with pytest.raises(UserError) as error:
            _resume(tmp_path, examples, _model(["q_proj", "v_proj", "down_proj"]))
    assert (
        "--target-modules ['q_proj', 'v_proj', 'down_proj'] (the checkpoint's: "
        "['q_proj', 'v_proj'])"
    ) in str(error.value)


# ---------------------------------------------------------------- 3. flags, not fields
def test_resume_differences_are_named_by_their_flags(tmp_path):
    saved_plan = {"batches": "shuffle", "global_batch": 4, "total_steps": 8}
    saved_lora = {"lora_alpha": 8, "target_modules": "all-linear"}
    state = {"step": 2, "data_plan": saved_plan, "lora_config": saved_lora}
    plan = {"batches": "shuffle", "global_batch": 1, "total_steps": 4}
    lora = {"lora_alpha": 16, "target_modules": ["q_proj"]}
    with pytest.raises(UserError) as error:
        check_resumable(tmp_path, state, plan, _config(tmp_path), lora)
    message = str(error.value)
    assert (
        "a global batch (--batch-size x --grad-accum x processes) of 1 (the checkpoint's: 4)"
        in (message)
    )
    assert "4 optimizer steps (the checkpoint's: 8; --steps / --epochs)" in message
    assert "--alpha 16 (the checkpoint's: 8)" in message
    assert "--target-modules ['q_proj'] (the checkpoint's: 'all-linear')" in message
    assert not re.search(r"global batch 1|total steps|lora_alpha|target_modules", message)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("r", 0, "--r 0 is invalid: expected a positive integer"),
        ("alpha", float("nan"), "--alpha nan is invalid: expected a finite number"),
        ("dropout", 2.0, "--dropout 2.0 is invalid: expected a probability in [0, 1)"),
    ],
)
def test_invalid_lora_settings_are_named_by_their_flags(field, value, expected):
    with pytest.raises(UserError) as error:
        TrainSettings(data="x.jsonl", **{field: value}).lora_config()
    assert str(error.value) == f"invalid LoRA settings: {expected}."
    assert "LoraConfig" not in str(error.value)


# ---------------------------------------------------------------- 4. CSV remedies
def _train_flags() -> set[str]:
    flags = {"--config", "--nproc", "--help"}
    for option in option_fields():
        flags |= {flag_name(option), *option.metadata["aliases"]}
    return flags


def _named_flags(message: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message))


def test_csv_with_one_label_says_what_a_command_line_user_can_do(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\ngood film,pos\nbad film,pos\n")
    with pytest.raises(UserError) as error:
        data.load_examples(path)
    message = str(error.value)
    assert _named_flags(message) <= _train_flags()
    assert "add rows of the other class" in message
    assert f"lorakit.data.load_examples('{path}', label_words=['pos', '<other class>'])" in message


def test_csv_label_outside_label_words_names_no_missing_flag(tmp_path):
    path = tmp_path / "lw.csv"
    path.write_text("text,label\ngood film,pos\nbad film,neu\n")
    with pytest.raises(UserError) as error:
        data.load_examples(path, label_words=["pos", "neg"])
    message = str(error.value)
    assert "--label-words" not in message and _named_flags(message) <= _train_flags()
    assert "label 'neu' is not one of ['neg', 'pos']" in message
    assert "lorakit.data.load_examples(..., label_words=...)" in message


def test_csv_without_the_text_column_says_to_rename_the_header(tmp_path):
    path = tmp_path / "col.csv"
    path.write_text("sentence,label\ngood film,pos\nbad film,neg\n")
    with pytest.raises(UserError) as error:
        data.load_examples(path)
    message = str(error.value)
    assert "no column 'text'; the columns are ['sentence', 'label']" in message
    assert "Rename the header row's columns to 'text,label'" in message
    assert _named_flags(message) <= _train_flags()


# ---------------------------------------------------------------- 5. fractional --epochs
@pytest.mark.parametrize(
    ("epochs", "steps_per_epoch"), [(2.5, 1), (1.5, 3), (0.5, 5), (0.25, 2), (1.0, 7)]
)
def test_fractional_epochs_count_up_as_transformers_does(epochs, steps_per_epoch):
    expected = math.ceil(epochs * steps_per_epoch)  # transformers.Trainer's max_steps
    assert TrainingConfig(epochs=epochs).total_steps(steps_per_epoch) == expected


def test_epochs_whose_product_is_whole_up_to_float_rounding_are_not_counted_up():
    assert 0.07 * 100 > 7 and 0.14 * 50 > 7  # (float rounding)
    assert TrainingConfig(epochs=0.07).total_steps(100) == 7
    assert TrainingConfig(epochs=0.14).total_steps(50) == 7


def test_two_and_a_half_epochs_of_one_step_train_three_steps(tmp_path):
    config = _config(tmp_path, max_steps=None, epochs=2.5, batch_size=16)
    result = train(_model(), make_data(16), pad_collate(0), config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert result.steps == 3 and [r["step"] for r in records if "loss" in r] == [1, 2, 3]
