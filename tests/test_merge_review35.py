"""Fixes from the 35th review of merging, with the real ``peft`` package as the oracle:

1. ``lorakit.merge`` / ``merge_and_unload`` / ``io.save_merged_model`` given a ``PeftModel``
   after ``disable_adapter_layers()`` merged nothing (the model inside has no active adapter)
   and wrote the base weights; they now merge the wrapper's ``active_adapters``, as PEFT does,
   and a model with adapters none of which is active, named or merged is refused.
2. docs/migrating-from-peft.md said a merged model computes its adapters "exactly": it computes
   with the merged weight (within rounding) and the factors get no gradient.
3. ``PeftModel.unload()`` of a merged model gives the base weights back (peft 0.21 keeps the
   merged ones): documented as a deliberate difference, and pinned here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import LoraConfig
from lorakit.io import save_merged_model
from lorakit.state import lora_layers
from tests import tiny_models
from tests.peft_pairs import front_door_pair

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-peft.md"
FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny_models.input_ids()).logits


def _merged_sets(model) -> set[tuple[str, ...]]:
    return {layer.merged_adapters for _, layer in lora_layers(model)}


def _disabled_pair():
    """lorakit's and peft's front doors with the same adapters ('default' active, 'b' not),
    both after ``disable_adapter_layers()``; and the adapted model's logits (peft's, enabled)."""
    ours, theirs = front_door_pair(FIRST, SECOND, "b")
    adapted = _logits(theirs)
    ours.disable_adapter_layers()
    theirs.base_model.disable_adapter_layers()
    return ours, theirs, adapted


# ------------------------------------------------- 1. a disabled wrapper: its active adapters
def _merged_by_function(ours, tmp_path):
    return lorakit.merge_and_unload(ours)


def _merged_by_method(ours, tmp_path):
    return ours.merge_and_unload()


def _merged_and_saved(ours, tmp_path):
    save_merged_model(ours, tmp_path / "merged")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()


@pytest.mark.parametrize(
    "merge_it",
    [_merged_by_function, _merged_by_method, _merged_and_saved],
    ids=["lorakit.merge_and_unload", "PeftModel.merge_and_unload", "save_merged_model"],
)
def test_a_disabled_peft_model_merges_its_active_adapters_as_peft_does(merge_it, tmp_path):
    ours, theirs, adapted = _disabled_pair()
    base = _logits(tiny_models.llama())
    assert (adapted - base).abs().max() > 0.1  # (so merging nothing cannot pass)
    expected = _logits(theirs.merge_and_unload())  # PEFT merges the active 'default'
    torch.testing.assert_close(expected, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(merge_it(ours, tmp_path)), expected, rtol=0, atol=1e-5)


def test_lorakit_merge_of_a_disabled_peft_model_merges_as_merge_adapter_does():
    ours, _, adapted = _disabled_pair()
    lorakit.merge(ours)
    assert _merged_sets(ours) == {("default",), ()}  # (o_proj holds only 'b': not merged)
    assert ours.active_adapters == ["default"]
    torch.testing.assert_close(_logits(ours), _logits(tiny_models.llama()), rtol=0, atol=0)
    ours.enable_adapter_layers()  # now each merged layer computes its merged weight
    torch.testing.assert_close(_logits(ours), adapted, rtol=0, atol=1e-5)


def test_names_given_with_a_disabled_wrapper_win_over_its_active_adapters():
    """``adapter_names`` given still wins over the wrapper's active adapters."""
    ours, theirs, _ = _disabled_pair()
    merged = lorakit.merge_and_unload(ours, ["b"])
    expected = _logits(theirs.merge_and_unload(adapter_names=["b"]))
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)


def _model_inside_disabled_wrapper():
    ours, _, _ = _disabled_pair()
    return ours.model


def _plain_model_with_none_active():
    model = lorakit.inject(tiny_models.llama(), LoraConfig(**FIRST))
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.set_active(model, ())
    return model


@pytest.mark.parametrize(
    "build", [_model_inside_disabled_wrapper, _plain_model_with_none_active], ids=["inner", "plain"]
)
@pytest.mark.parametrize("call", ["merge", "merge_and_unload", "save_merged_model"])
def test_a_model_with_no_active_adapter_is_refused_before_any_change(build, call, tmp_path):
    model = build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    target = tmp_path / "merged"
    run = {
        "merge": lambda: lorakit.merge(model),
        "merge_and_unload": lambda: lorakit.merge_and_unload(model),
        "save_merged_model": lambda: save_merged_model(model, target),
    }[call]
    with pytest.raises(ValueError, match=r"no adapter of this model is active") as raised:
        run()
    message = str(raised.value)
    assert "enable_adapter_layers()" in message and "adapter_names=[...], of ['default'" in message
    assert not target.exists()
    assert list(lora_layers(model)) and _merged_sets(model) == {()}
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_naming_the_adapters_of_a_model_with_none_active_merges_them():
    model = _plain_model_with_none_active()
    with lorakit.use_adapters(model, ["default"]):
        adapted = _logits(model)
    merged = lorakit.merge_and_unload(model, ["default"])
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)


def test_an_earlier_merge_with_none_active_is_still_folded_in():
    """Nothing active but a layer merged: the result is not the base, so it is not refused."""
    model = lorakit.inject(tiny_models.llama(), LoraConfig(**FIRST))
    tiny_models.randomize_adapters(model, std=0.2)
    adapted = _logits(model)
    lorakit.merge(model)
    lorakit.set_active(model, ())
    torch.testing.assert_close(_logits(lorakit.merge_and_unload(model)), adapted, atol=1e-5, rtol=0)


# ------------------------------------------------- 2. what a merged model computes, in words
def test_a_merged_model_computes_with_the_merged_weight_and_trains_nothing():
    model = lorakit.inject(tiny_models.llama(), LoraConfig(**FIRST))
    tiny_models.randomize_adapters(model, std=0.2)
    unmerged = _logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(_logits(model), unmerged, rtol=0, atol=1e-5)
    model.train()
    ids = tiny_models.input_ids()
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(input_ids=ids, labels=ids).loss.backward()
    lorakit.unmerge(model)  # what the guide says to do before training
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.grad is not None


def test_the_guide_says_how_a_merged_model_computes():
    text = " ".join(DOC.read_text().split())
    assert "exactly, merged or not" not in text
    assert "computes with its merged weight `W0 + sum s B A`" in text
    assert 'torch\'s "element 0 of tensors does not require grad"' in text
    assert "`lorakit.unmerge(model)` before training" in text


# ------------------------------------------------- 3. unload() of a merged model
def test_unload_of_a_merged_model_gives_the_base_weights_where_peft_keeps_the_merged():
    ours, theirs = front_door_pair(FIRST, SECOND, "b")
    base = tiny_models.llama()
    ours.merge_adapter()
    theirs.merge_adapter()
    ours_plain, theirs_plain = ours.unload(), theirs.unload()
    for name, weight in base.state_dict().items():
        assert torch.equal(ours_plain.state_dict()[name], weight), name
    torch.testing.assert_close(_logits(ours_plain), _logits(base), rtol=0, atol=0)
    # peft 0.21 keeps W0 + s B A in the adapted layers (what merge_and_unload gives)
    ours_q = ours_plain.model.layers[0].self_attn.q_proj.weight
    theirs_q = theirs_plain.model.layers[0].self_attn.q_proj.weight
    assert (theirs_q - ours_q).abs().max() > 1e-3


def test_the_guide_lists_unload_of_a_merged_model_as_a_difference():
    text = DOC.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `merge_and_unload()`"))
    assert "`unload()` of a merged model gives back the original weights" in row
    differences = text.split("## Where lorakit deliberately differs")[1].split("\n## ")[0]
    assert "**`unload()` of a merged model gives back the base weights.**" in differences
    assert "call `merge_and_unload()`" in differences
