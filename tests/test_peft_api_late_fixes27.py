"""The second read of the PEFT front door's fixes: ``set_adapter`` on a merged model unmerges
first, as PEFT does (an earlier merge stayed in the weights and a later ``merge_adapter`` or
``merge_and_unload`` added to it); ``save_pretrained(selected_adapters=[])`` writes no adapter,
as PEFT."""

from __future__ import annotations

import peft
import pytest
import torch

from tests import tiny_models
from tests.peft_pairs import front_door_pair

FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=tiny_models.input_ids()).logits


@pytest.mark.parametrize("then", ["merge_adapter", "merge_and_unload"])
def test_set_adapter_on_a_merged_model_unmerges_first_as_peft_does(then):
    ours, theirs = front_door_pair(FIRST, SECOND, "b")
    ours, theirs = ours.double(), theirs.double()
    for model in (ours, theirs):
        model.merge_adapter()  # 'default'
        with pytest.warns(UserWarning, match="Unmerging the model first"):
            model.set_adapter("b")
    assert not any(layer.merged for layer in theirs.modules() if hasattr(layer, "merged"))
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-6)
    if then == "merge_adapter":
        ours.merge_adapter()
        theirs.merge_adapter()
        ours_out, theirs_out = _logits(ours), _logits(theirs)
    else:
        ours_out, theirs_out = _logits(ours.merge_and_unload()), _logits(theirs.merge_and_unload())
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=1e-6)
    # 'b' alone: the float64 model with only 'b' active and nothing merged
    reference, _ = front_door_pair(FIRST, SECOND, "b")
    reference = reference.double()
    reference.set_adapter("b")
    torch.testing.assert_close(ours_out, _logits(reference), rtol=0, atol=1e-6)


def test_no_selected_adapters_writes_no_adapter_as_peft(tmp_path):
    ours, theirs = front_door_pair(FIRST, SECOND, "b")
    ours.save_pretrained(tmp_path / "ours", selected_adapters=[])
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=[])
    assert not list((tmp_path / "ours").rglob("adapter_model.safetensors"))
    assert not list((tmp_path / "theirs").rglob("adapter_model.safetensors"))
    assert isinstance(theirs, peft.PeftModel)


@pytest.mark.parametrize("disabled", [False, True])
def test_an_unknown_adapter_is_a_value_error_as_in_peft(disabled):
    ours, theirs = front_door_pair(FIRST, SECOND, "b")
    if disabled:
        ours.disable_adapter_layers()
    with pytest.raises(ValueError, match="nope"):
        theirs.set_adapter("nope")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]") as caught:
        ours.set_adapter("nope")
    assert isinstance(caught.value, KeyError)  # (and still a KeyError, as lorakit raised)
    assert str(caught.value).startswith("unknown adapter")  # no KeyError quotes


def test_merging_an_unknown_adapter_is_an_unknown_adapter_error():
    import lorakit
    from lorakit.errors import UnknownAdapterError

    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(**FIRST), "a")
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(UnknownAdapterError) as caught:
            call(model, ["nope"])
        assert isinstance(caught.value, ValueError) and str(caught.value).startswith("unknown")
