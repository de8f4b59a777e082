"""New LoRA layers take the training mode of the module they wrap (issue 12, item 9): adding an
adapter to an eval-mode model must not switch its dropout on, so greedy outputs stay the same call
after call; a train-mode model stays in train mode. ``PeftModel.from_pretrained`` /
``load_adapter`` put the model in eval mode unless ``is_trainable=True``, as peft does."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, PeftModel
from lorakit.state import lora_layers, saved_modules
from tests import tiny_models

DROPOUT_CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)


def _lora_modes(model: torch.nn.Module) -> set[bool]:
    """The ``training`` flag of every module inside every LoRA layer (the layer included)."""
    modes = {module.training for _, layer in lora_layers(model) for module in layer.modules()}
    assert modes, "the model has no LoRA layer"
    return modes


def _two_outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tiny_models.input_ids()
    with torch.no_grad():
        return model(ids).logits, model(ids).logits


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A dropout-0.5 adapter with non-zero B, saved once (lorakit's format = peft's)."""
    model = lorakit.inject(tiny_models.llama(), LoraConfig(**DROPOUT_CONFIG))
    tiny_models.randomize_adapters(model, std=0.2)
    directory = tmp_path_factory.mktemp("adapter")
    lorakit.save_adapter(model, directory)
    return directory


def test_inject_into_an_eval_model_keeps_dropout_off():
    model = lorakit.inject(tiny_models.llama().eval(), LoraConfig(**DROPOUT_CONFIG))
    tiny_models.randomize_adapters(model, std=0.2)
    assert _lora_modes(model) == {False} and not model.training
    first, second = _two_outputs(model)
    assert torch.equal(first, second)


def test_inject_into_a_train_model_keeps_dropout_on():
    model = lorakit.inject(tiny_models.llama().train(), LoraConfig(**DROPOUT_CONFIG))
    tiny_models.randomize_adapters(model, std=0.2)
    assert _lora_modes(model) == {True} and model.training
    first, second = _two_outputs(model)
    assert not torch.equal(first, second)  # dropout p=0.5 draws two different masks


def test_second_adapter_on_an_existing_layer_follows_the_layer_mode():
    model = lorakit.inject(tiny_models.llama().eval(), LoraConfig(**DROPOUT_CONFIG))
    lorakit.inject(model, LoraConfig(**DROPOUT_CONFIG), "second", activate=True)
    assert _lora_modes(model) == {False}


def test_modules_to_save_wrapper_follows_the_wrapped_head():
    config = LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    model = lorakit.inject(tiny_models.bert().eval(), config)
    (_, wrapper), *_ = list(saved_modules(model))
    assert {module.training for module in wrapper.modules()} == {False}


def test_load_adapter_into_an_eval_model_keeps_dropout_off(saved_adapter):
    model = lorakit.load_adapter(tiny_models.llama().eval(), saved_adapter)
    assert _lora_modes(model) == {False}
    first, second = _two_outputs(model)
    assert torch.equal(first, second)
    train_model = lorakit.load_adapter(tiny_models.llama().train(), saved_adapter)
    assert _lora_modes(train_model) == {True} and train_model.training


@pytest.mark.parametrize("start", ["eval", "train"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_peft_model_from_pretrained_mode_matches_peft(saved_adapter, start, is_trainable):
    """peft 0.21: ``is_trainable=False`` -> the whole model in eval mode, whatever it was;
    ``is_trainable=True`` leaves the model's mode (peft then leaves its new dropout modules in
    train mode even on an eval model; lorakit's follow the wrapped module: see the docs)."""
    base = getattr(tiny_models.llama(), start)()
    ours = PeftModel.from_pretrained(base, saved_adapter, is_trainable=is_trainable)
    peft_base = getattr(tiny_models.llama(), start)()
    theirs = peft.PeftModel.from_pretrained(peft_base, saved_adapter, is_trainable=is_trainable)
    assert ours.model.training == peft_base.training
    expected = start == "train" if is_trainable else False
    assert ours.model.training is expected and ours.training is expected
    assert {m.training for m in ours.model.modules()} == {expected}
    if not is_trainable:
        assert {m.training for m in theirs.modules()} == {False}
        first, second = _two_outputs(ours)
        assert torch.equal(first, second)


def test_peft_model_load_adapter_puts_the_model_in_eval_mode_like_peft(saved_adapter):
    ours = lorakit.get_peft_model(tiny_models.llama().train(), LoraConfig(**DROPOUT_CONFIG))
    theirs = peft.get_peft_model(tiny_models.llama().train(), peft.LoraConfig(**DROPOUT_CONFIG))
    ours.load_adapter(saved_adapter, "loaded")
    theirs.load_adapter(saved_adapter, "loaded")
    assert ours.training is theirs.training is False
    assert {m.training for m in ours.modules()} == {False}
    ours.train()
    ours.load_adapter(saved_adapter, "trainable", is_trainable=True)
    assert {m.training for m in ours.modules()} == {True}
