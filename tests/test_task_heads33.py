"""``TOKEN_CLS`` and ``QUESTION_ANS`` train and save the task's head, as PEFT's task models do
(review 33: only ``SEQ_CLS`` did, so the newly initialised head of a token classifier or a QA
model stayed random, frozen and out of the adapter file). Oracle: peft 0.21.2."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

import lorakit
from lorakit import targets
from lorakit.io.load_plan import TaskHeadFromBaseWarning
from tests import tiny_models
from tests.tiny_models import BERT_SIZES

CASES = {
    "TOKEN_CLS": (
        BertForTokenClassification,
        "classifier",
        ["classifier", "score", "pre_classifier"],
    ),
    "QUESTION_ANS": (BertForQuestionAnswering, "qa_outputs", ["qa_outputs"]),
}


def _base(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    labels = 3 if task == "TOKEN_CLS" else 2  # (a QA head has two outputs: start, end)
    config = BertConfig(**BERT_SIZES, num_labels=labels, hidden_dropout_prob=0.0)
    return CASES[task][0](config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("task", sorted(CASES))
def test_the_task_head_is_trained_and_saved_as_peft_does(task, tmp_path) -> None:
    base = _base(task)
    _, head, entries = CASES[task]
    kwargs = dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trained = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert any(name.startswith(f"{head}.") for name in trained), trained
    with torch.no_grad():  # a trained head: the file must carry it
        for name, parameter in ours.model.named_parameters():
            if name.startswith(f"{head}.") and parameter.requires_grad:
                parameter.add_(0.5)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    their_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(our_file) == sorted(their_file)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == entries
    # peft reads lorakit's file, trained head included: the same outputs
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    expected = ours.eval()(_ids())
    got = loaded(_ids())
    for key in ("logits",) if task == "TOKEN_CLS" else ("start_logits", "end_logits"):
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
        assert not torch.allclose(got[key], base(_ids())[key], atol=1e-3), key


def test_peft_token_cls_files_keep_their_modules_to_save_when_saved_again(tmp_path) -> None:
    base = _base("TOKEN_CLS")
    config = peft.LoraConfig(r=2, target_modules=["query"], task_type="TOKEN_CLS")
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "peft")
    model = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier", "score", "pre_classifier"]  # peft 0.22's


def test_all_linear_leaves_the_token_classifier_head_out_of_the_targets() -> None:
    """PEFT fails here ("modules_to_save cannot be applied to modules of type Linear"): it
    adds the head after placing LoRA on it. lorakit trains the head in full, LoRA elsewhere."""
    base = _base("TOKEN_CLS")
    config = lorakit.LoraConfig(r=2, target_modules="all-linear", task_type="TOKEN_CLS")
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    assert "classifier" not in model.peft_config["default"].target_modules
    trained = {n for n, p in model.model.named_parameters() if p.requires_grad}
    head = {n for n in trained if n.startswith("classifier.")}
    assert head and not any("lora_" in n for n in head), head
    assert any("lora_A" in n for n in trained) and len(trained) > len(head)


@pytest.mark.parametrize("task", sorted(CASES))
def test_a_file_saved_before_the_heads_were_trained_loads_with_the_models_head(
    task, tmp_path, monkeypatch
):
    """Regression review 33: lorakit's TOKEN_CLS / QUESTION_ANS files of before this round have
    ``modules_to_save: null`` and no head tensors; they loaded (the head the model's own) and
    must still load, saying so, with the outputs of the model they were saved from."""
    base = _base(task)
    with monkeypatch.context() as old_code:  # the rule before: a head for SEQ_CLS only
        old_code.setattr(targets, "TASK_HEADS", {"SEQ_CLS": targets.SEQ_CLS_HEADS})
        config = lorakit.LoraConfig(r=2, target_modules=["query", "value"], task_type=task)
        old = lorakit.inject(copy.deepcopy(base), config)
        tiny_models.randomize_adapters(old)
        lorakit.save_adapter(old, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task
    model = copy.deepcopy(base)
    with pytest.warns(TaskHeadFromBaseWarning, match=CASES[task][1]) as caught:
        lorakit.load_adapter(model, tmp_path)
    assert caught[0].filename == __file__  # (pointing at the call)
    expected, got = old.eval()(_ids()), model.eval()(_ids())
    for key in ("logits",) if task == "TOKEN_CLS" else ("start_logits", "end_logits"):
        assert torch.equal(got[key], expected[key]), key
    lorakit.save_adapter(model, tmp_path / "again")  # saved again: the head is in the file now
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert any(f".{CASES[task][1]}." in key for key in again)


def test_a_seq_cls_file_without_its_head_is_still_refused(tmp_path, monkeypatch):
    """SEQ_CLS heads were always saved: a SEQ_CLS file without one is incomplete, refused as
    before, not loaded with the model's new random head (regression review 33: a first version
    of the fallback above took SEQ_CLS too, logits 1.26 off)."""
    torch.manual_seed(0)
    base = tiny_models.bert()
    with monkeypatch.context() as no_heads:  # a file written without the head's tensors
        no_heads.setattr(targets, "TASK_HEADS", {})
        config = lorakit.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
        lorakit.save_adapter(lorakit.inject(copy.deepcopy(base), config), tmp_path)
    with pytest.raises(lorakit.AdapterFileError, match=r"classifier\.weight"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)
