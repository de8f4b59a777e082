"""Review 38, small defects.

1. A model whose modules accelerate offloaded after ``inject`` of a ``bias="all"`` /
   ``"lora_only"`` adapter: a forward that records gradients was refused, with a message blaming
   "an adapter with bias='all' or 'lora_only'", also after ``delete_adapter`` of that adapter,
   inside ``lorakit.disabled`` and with only a ``bias="none"`` adapter active. No adapter of
   such a call trains a bias: it now runs, as peft 0.22 runs it on the same offloaded model
   (the oracle: its loss and its LoRA gradients); a call whose adapter trains biases is still
   refused.
2. ``lorakit inspect`` showed a peft < 0.22 file's ``modules_to_save`` / token keys as written;
   it now says which peft wrote the file and, per entry read otherwise than by peft 0.22's
   rule, the modules ``load_adapter`` loads it as (the oracle: ``load_adapter`` itself, and the
   modules peft 0.21 saved tensors for).
"""

from __future__ import annotations

import copy
import re
import warnings

import peft
import pytest
import torch
from accelerate import cpu_offload

import lorakit
from lorakit.commands.inspect import format_summary
from lorakit.io.summary import summarize_adapter
from tests import tiny_models
from tests.offloaded_models import TOL
from tests.test_offload_after_inject37 import C_FC, GPT2, _adapted, _lm_loss, _offload_mlps
from tests.test_older_peft_files_paths37 import FIELDS, NORMS, _peft021_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CASES = ["gpt2-cpu_offload", "gpt2-dispatch_model"]


def _peft_offloaded(case: str, tmp_path, bias: str) -> peft.PeftModel:
    """peft 0.22's model for the same adapter (zero B: the base's output) with an extra
    ``bias="none"`` adapter "b", its MLPs offloaded as ``_offload_mlps`` does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_models.gpt2(seed=0), peft.LoraConfig(**GPT2, bias=bias))
        model.add_adapter("b", peft.LoraConfig(**GPT2))
    _offload_mlps(model.base_model.model, case, tmp_path / "peft")
    return model


def _ours(case: str, tmp_path) -> torch.nn.Module:
    model = _offload_mlps(_adapted("gpt2", bias="all"), case, tmp_path / "ours")
    lorakit.inject(model, lorakit.LoraConfig(**GPT2), adapter_name="b")
    return model


def _b_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of adapter "b"'s lora_B factors, by module path."""
    found = {}
    for name, parameter in model.named_parameters():
        if re.search(r"lora_B\.b\.weight$", name) and parameter.grad is not None:
            path = name.removeprefix("base_model.model.").split(".lora_B")[0]
            found[path.removesuffix(".base_layer")] = parameter.grad.detach().clone()
    return found


@pytest.mark.parametrize("case", CASES)
def test_a_forward_after_deleting_the_bias_adapter_runs_as_peft(case, tmp_path) -> None:
    theirs = _peft_offloaded(case, tmp_path, "all")
    theirs.delete_adapter("default")  # (peft then activates "b")
    want = theirs(tiny_models.input_ids(), labels=tiny_models.input_ids()).loss
    want.backward()
    model = _ours(case, tmp_path)
    lorakit.set_active(model, ["default", "b"])
    lorakit.delete_adapter(model, "default")
    got = _lm_loss(model)
    got.backward()
    assert abs(got.item() - want.item()) <= TOL
    grads, peft_grads = _b_grads(model), _b_grads(theirs)
    assert grads.keys() == peft_grads.keys() and len(grads) == 2
    for path, value in peft_grads.items():
        assert (grads[path] - value).abs().max().item() <= TOL, path


@pytest.mark.parametrize("case", CASES)
def test_a_forward_inside_disabled_runs_as_peft_and_training_stays_refused(case, tmp_path):
    theirs = _peft_offloaded(case, tmp_path, "all")
    with theirs.disable_adapter():
        want = theirs(tiny_models.input_ids(), labels=tiny_models.input_ids()).loss
    model = _ours(case, tmp_path)
    lorakit.set_active(model, ["default"])  # (its bias="all" trains the offloaded MLP biases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (disabled's warning about trained biases)
        with lorakit.disabled(model):
            got = _lm_loss(model)
    assert abs(got.item() - want.item()) <= TOL
    with pytest.raises(ValueError, match=C_FC):  # ("default", bias="all", active again)
        _lm_loss(model)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_none_adapter_trains_there_as_peft(bias, tmp_path) -> None:
    case = "gpt2-cpu_offload"
    theirs = _peft_offloaded(case, tmp_path, bias)
    theirs.set_adapter("b")
    want = theirs(tiny_models.input_ids(), labels=tiny_models.input_ids()).loss
    want.backward()
    model = _offload_mlps(_adapted("gpt2", bias=bias), case, tmp_path / "ours")
    for block in model.transformer.h:  # (the LoRA bases offloaded too)
        cpu_offload(block.attn, execution_device=torch.device("cpu"))
    lorakit.inject(model, lorakit.LoraConfig(**GPT2), adapter_name="b")
    lorakit.set_active(model, ["b"])
    got = _lm_loss(model)
    got.backward()
    assert abs(got.item() - want.item()) <= TOL
    peft_grads = _b_grads(theirs)
    for path, value in _b_grads(model).items():
        assert (value - peft_grads[path]).abs().max().item() <= TOL, path


# ---------------------------------------------------------------- 2. inspect
def test_inspect_names_the_writer_and_the_modules_a_0_21_file_loads_as(tmp_path) -> None:
    directory = tmp_path / "norm"
    full = {"modules_to_save": NORMS, "trainable_token_indices": {"model.embed_tokens": [1, 2]}}
    as_021 = {"modules_to_save": ["norm"], "trainable_token_indices": {"tokens": [1, 2]}}
    _peft021_file(directory, tiny_models.llama(), full, as_021, **FIELDS)
    model = copy.deepcopy(tiny_models.llama())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.load_adapter(model, directory)
    loaded = lorakit.adapter_configs(model)["default"]
    assert sorted(loaded.modules_to_save) == sorted(NORMS)  # (what the oracle loads)
    summary = summarize_adapter(directory)
    assert summary["peft_version"].startswith("0.21")
    assert summary["modules_to_save"] == ["norm"]  # (the config as written)
    saved_line, token_line = summary["read_as_written"]
    assert saved_line.startswith("modules_to_save 'norm': every module whose name ends with it")
    assert saved_line.split(": ")[2].split(" (")[0].split(", ") == loaded.modules_to_save
    assert token_line.startswith("trainable_token_indices 'tokens': ")
    assert list(loaded.trainable_token_indices) == ["model.embed_tokens"]
    assert "picked them: model.embed_tokens (" in token_line
    text = format_summary(summary)
    assert re.search(rf"written by: +peft {re.escape(summary['peft_version'])}\n", text)
    assert text.count("read as written:") == 2


def test_inspect_of_a_lorakit_file_says_the_version_is_not_recorded(tmp_path) -> None:
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(**FIELDS, modules_to_save=["norm"])
    )
    lorakit.save_adapter(model, tmp_path / "ours")
    summary = summarize_adapter(tmp_path / "ours")
    assert summary["peft_version"] is None and summary["read_as_written"] == []
    assert re.search(
        r"written by: +not recorded \(lorakit, or peft < 0.18\)", format_summary(summary)
    )
