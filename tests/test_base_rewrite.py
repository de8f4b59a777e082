"""``lorakit.base_rewrite``: PiSSA / OLoRA / LoftQ plan every layer's ``W_res`` first (the
factorisations) and write them last, so a failure or a Ctrl-C never leaves a half-rewritten
model, and no copy of the base weights is kept to make that so."""

from __future__ import annotations

import copy
import gc
import signal
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.base_rewrite import BaseRewrite
from tests import tiny_models

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(init: str) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=init)


def _fail_on_write(monkeypatch, number: int) -> list[str]:
    """Make the ``number``-th ``W_res`` write raise (as running out of memory would); returns
    the names written before it, in order."""
    real, written = BaseRewrite.write, []

    def failing(self):
        if len(written) + 1 == number:
            raise MemoryError("no memory for the residual")
        real(self)
        written.append(self.name)

    monkeypatch.setattr(BaseRewrite, "write", failing)
    return written


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_failure_while_writing_puts_back_the_weights_written(init, monkeypatch):
    original = tiny_models.llama()
    model = copy.deepcopy(original)
    written = _fail_on_write(monkeypatch, 3)
    with pytest.raises(MemoryError):
        lorakit.inject(model, _config(init))
    assert len(written) == 2
    assert not hasattr(model, "lorakit_state")
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    theirs = original.state_dict()
    for key, value in model.state_dict().items():
        if any(key.startswith(f"{name}.") for name in written):  # W_res + s B A: one rounding
            bound = 4 * torch.finfo(value.dtype).eps * theirs[key].abs().max()
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=bound.item())
        else:
            assert torch.equal(value, theirs[key]), key


def test_a_loftq_failure_while_writing_names_the_weights_it_cannot_put_back(monkeypatch):
    model = tiny_models.llama()
    written = _fail_on_write(monkeypatch, 2)
    with pytest.raises(MemoryError) as error:
        lorakit.inject(model, _config("loftq"))
    assert written == ["model.layers.0.self_attn.q_proj"]
    note = " ".join(getattr(error.value, "__notes__", []))
    assert "'model.layers.0.self_attn.q_proj'" in note and "load the model again" in note
    assert not hasattr(model, "lorakit_state")


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_ctrl_c_while_writing_lands_after_the_inject_is_complete(init, monkeypatch):
    reference = lorakit.inject(tiny_models.llama(), _config(init))
    model = tiny_models.llama()
    real, calls = BaseRewrite.write, []

    def interrupted(self):
        if not calls:
            signal.raise_signal(signal.SIGINT)  # the handler runs here, before the write
        calls.append(self.name)
        real(self)

    monkeypatch.setattr(BaseRewrite, "write", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as
    try:  # a script has it (an earlier test or library may have left another one)
        with pytest.raises(KeyboardInterrupt):
            lorakit.inject(model, _config(init))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 6  # every layer written after the signal
    theirs = reference.state_dict()
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_no_copy_of_the_base_weights_is_alive_while_they_are_written(monkeypatch):
    """A copy of every rewritten weight (to undo a failure) would double the memory of the
    adapted weights; the recipes hold only the rank-r factors."""
    model = tiny_models.llama()
    shapes = {tuple(model.get_submodule(n).weight.shape) for n, _ in _targets(model)}
    real, alive = BaseRewrite.write, []
    gc.collect()
    before = _foreign_tensors(model, shapes)  # (earlier tests' tensors may still be alive)

    def counting(self):
        gc.collect()
        alive.append(len(_foreign_tensors(model, shapes) - before))
        real(self)

    monkeypatch.setattr(BaseRewrite, "write", counting)
    lorakit.inject(model, _config("pissa"))
    assert alive == [0] * 6


def _foreign_tensors(model, shapes) -> set[int]:
    """The ids of the live tensors of a target weight's shape (either way round) outside
    ``model``'s own."""
    ours = {p.data_ptr() for p in model.parameters()}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes
        warnings.simplefilter("ignore")
        return {
            id(obj)
            for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor)
            and tuple(obj.shape) in shapes | {s[::-1] for s in shapes}
            and obj.untyped_storage().data_ptr() not in ours
        }


def test_loading_an_unconverted_pissa_file_is_unchanged_by_a_failure_while_writing(
    tmp_path, monkeypatch
):
    """The load path (a file peft saved unconverted: lorakit reruns PiSSA on the base, as peft
    does) writes last too."""
    theirs = peft.get_peft_model(
        tiny_models.llama(),
        peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights="pissa"),
    )
    theirs.save_pretrained(tmp_path)
    original = tiny_models.llama()
    model = copy.deepcopy(original)
    _fail_on_write(monkeypatch, 2)
    with pytest.raises(MemoryError):
        lorakit.load_adapter(model, tmp_path)
    assert not hasattr(model, "lorakit_state")
    theirs = original.state_dict()
    for key, value in model.state_dict().items():
        bound = 4 * torch.finfo(value.dtype).eps * theirs[key].abs().max()
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=bound.item())


def _targets(model):
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]
