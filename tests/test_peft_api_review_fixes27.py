"""Fixes from the 27th review of the PEFT front door (``lorakit.PeftModel``), with the real
``peft`` package as the oracle: ``merge_adapter`` called several times, after
``disable_adapter_layers`` and before ``delete_adapter``; ``save_pretrained(selected_adapters)``;
a Hub id given as an adapter directory; ``unload`` with ``modules_to_save``; a bias-free adapter
beside one that trains biases; ``modules_to_save`` / ``active_peft_config``; the message of
``add_weighted_adapter`` for saved modules."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import AdapterFileError, UserError
from tests import tiny_models
from tests.peft_pairs import copy_into_peft, front_door_pair
from tests.peft_versions import peft_unload_keeps_the_saved_copy

FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
SECOND = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"])
SAVED = dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
GPT2 = dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=tiny_models.input_ids() if ids is None else ids).logits


def _double_pair():
    """lorakit's and peft's models with 'default' (active, q/v) and 'b' (v/o) in float64."""
    ours, theirs = front_door_pair(FIRST, SECOND, "b")
    return ours.double(), theirs.double()


# ------------------------------------------------- 1. merge_adapter twice: PEFT's per-layer rule
@pytest.mark.parametrize(
    "sequence",
    [[None, ["b"]], [["b"], None], [["b"], ["default"]], [["default"], ["b"]]],
    ids=["all-then-b", "b-then-all", "b-then-default", "default-then-b"],
)
def test_merging_twice_computes_what_every_layer_holds_as_peft_does(sequence):
    ours, theirs = _double_pair()
    for names in sequence:
        ours.merge_adapter(names)
        theirs.merge_adapter(names)
    merged = _logits(ours)
    torch.testing.assert_close(merged, _logits(theirs), rtol=0, atol=1e-6)
    # every layer holding 'default' and 'b' (v_proj) adds both: the float64 sum of both
    reference, _ = _double_pair()
    reference.set_adapter(["default", "b"])
    torch.testing.assert_close(merged, _logits(reference), rtol=0, atol=1e-6)
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    torch.testing.assert_close(_logits(ours.merge_and_unload()), merged, rtol=0, atol=1e-6)


# ------------------------------------------------- 2. deleting an adapter merged by name
def test_deleting_a_merged_inactive_adapter_leaves_the_active_one_computing():
    ours, theirs = _double_pair()
    default_only = _logits(theirs)  # peft: 'default' active, nothing merged
    ours.merge_adapter(["b"])
    ours.delete_adapter("b")  # (peft refuses to delete a merged adapter)
    assert ours.active_adapters == ["default"]
    torch.testing.assert_close(_logits(ours), default_only, rtol=0, atol=1e-6)
    for _, layer in lorakit.state.lora_layers(ours.model):
        assert layer.active_adapters == ("default",) * ("default" in layer.ranks)


# ------------------------------------------------- 3. merge_adapter while the layers are disabled
@pytest.mark.parametrize("names", [["b"], None], ids=["named", "active"])
def test_merging_while_disabled_keeps_the_base_output_until_enabled(names):
    ours, theirs = _double_pair()
    base = _logits(tiny_models.llama().double())
    ours.disable_adapter_layers()
    theirs.disable_adapter_layers()
    ours.merge_adapter(names)
    theirs.merge_adapter(names)  # (no peft forward here: it would unmerge)
    torch.testing.assert_close(_logits(ours), base, rtol=0, atol=1e-6)
    assert ours.active_adapters == ["default"]
    ours.enable_adapter_layers()
    theirs.enable_adapter_layers()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(ours), base, atol=1e-3)


# ------------------------------------------------- 4. save_pretrained(selected_adapters=...)
@pytest.mark.parametrize("selected", [["default", "nope"], "nope", ["nope"]])
def test_unknown_selected_adapters_are_refused_before_anything_is_written(tmp_path, selected):
    ours, _ = front_door_pair(FIRST, SECOND, "b")
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"selected_adapters=.*\['nope'\].*\['default', 'b'\]"):
        ours.save_pretrained(target, selected_adapters=selected)
    assert not target.exists()


def test_one_selected_adapter_given_as_a_string_is_that_adapter(tmp_path):
    ours, _ = front_door_pair(FIRST, SECOND, "b")
    ours.save_pretrained(tmp_path / "out", selected_adapters="default")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "out").eval()
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=1e-6)


# ------------------------------------------------- 5. a Hub id given as a directory
def test_a_hub_repository_id_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory someuser/some-lora-adapter
    fetch = r"snapshot_download\('someuser/some-lora-adapter'\)"
    with pytest.raises(AdapterFileError, match=rf"local directories only.*{fetch}"):
        PeftModel.from_pretrained(tiny_models.llama(), "someuser/some-lora-adapter")
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**FIRST))
    with pytest.raises(AdapterFileError, match=fetch):
        ours.load_adapter("someuser/some-lora-adapter", "other")
    with pytest.raises(AdapterFileError, match=r"does not exist\.$"):  # a path, not a repo id
        ours.load_adapter(str(tmp_path / "missing"), "other")


# ------------------------------------------------- 6. unload with modules_to_save
def _saved_pair():
    """lorakit's and peft's models whose 'default' adapter saves lm_head, the trained copy
    changed identically in both."""
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**SAVED))
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**SAVED))
    tiny_models.randomize_adapters(ours.model, std=0.2)
    copy_into_peft(ours, theirs)
    delta = torch.randn(128, 64, generator=torch.Generator().manual_seed(5)) * 0.5
    with torch.no_grad():
        ours.model.lm_head.modules_to_save["default"].weight.add_(delta)
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(delta)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unloading_keeps_the_active_adapters_saved_module_as_peft_does(how):
    """merge_and_unload keeps the active adapter's trained copy; unload, from peft 0.22, the
    original module (peft 0.21 kept the copy: there, the base model's logits are expected)."""
    ours, theirs = _saved_pair()
    if how == "unload" and peft_unload_keeps_the_saved_copy():
        expected = _logits(tiny_models.llama().eval())  # the original modules
    else:
        expected = _logits(getattr(theirs, how)())
    plain = getattr(ours, how)()
    assert not hasattr(plain, "lorakit_state")
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=1e-6)
    # the flags the model had before injection come back (transformers: all trainable)
    assert all(p.requires_grad for p in plain.parameters())


def test_lorakit_unload_still_restores_every_original_module():
    ours, _ = _saved_pair()
    frozen = tiny_models.llama().requires_grad_(False)
    frozen_peft = get_peft_model(frozen, LoraConfig(**SAVED))
    plain = lorakit.unload(ours)
    torch.testing.assert_close(_logits(plain), _logits(tiny_models.llama()), rtol=0, atol=0)
    assert not any(p.requires_grad for p in frozen_peft.unload().parameters())


# ------------------------------------------------- 7. one adapter with a bias, others without
def _bias_pair(bias: str):
    ours = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2, bias=bias))
    ours.add_adapter("b", LoraConfig(**GPT2))
    theirs = peft.get_peft_model(tiny_models.gpt2(), peft.LoraConfig(**GPT2, bias=bias))
    theirs.add_adapter("b", peft.LoraConfig(**GPT2))
    tiny_models.randomize_adapters(ours.model, std=0.2)
    copy_into_peft(ours, theirs)
    trained = torch.Generator().manual_seed(7)  # the biases as 'default' trained them
    with torch.no_grad():
        for name, parameter in ours.model.named_parameters():
            if parameter.requires_grad and name.endswith(".bias"):
                parameter.add_(torch.randn(parameter.shape, generator=trained) * 0.1)
                theirs.get_parameter("base_model.model." + name).copy_(parameter)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_free_adapter_beside_a_bias_adapter_matches_peft(bias):
    ours, theirs = _bias_pair(bias)
    ids = tiny_models.input_ids()
    for names in (["default"], ["b"], ["default", "b"]):
        ours.set_adapter(names)
        theirs.base_model.set_adapter(names)
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=0, atol=1e-5)
    ours_flags = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    their_flags = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {"base_model.model." + n for n in ours_flags} == their_flags


def test_two_adapters_that_train_biases_are_refused_as_in_peft():
    ours = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2, bias="none"))
    ours.add_adapter("b", LoraConfig(**GPT2, bias="all"))
    with pytest.raises(ValueError, match=r"'c'.*bias='lora_only'.*\['b'\]"):
        ours.add_adapter("c", LoraConfig(**GPT2, bias="lora_only"))
    theirs = peft.get_peft_model(tiny_models.gpt2(), peft.LoraConfig(**GPT2, bias="none"))
    theirs.add_adapter("b", peft.LoraConfig(**GPT2, bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.add_adapter("c", peft.LoraConfig(**GPT2, bias="lora_only"))
    assert list(ours.peft_config) == ["default", "b"]


# ------------------------------------------------- 8. modules_to_save, active_peft_config
@pytest.mark.parametrize("saves", [True, False])
def test_modules_to_save_and_active_peft_config_match_peft(saves):
    first = SAVED if saves else FIRST
    ours, theirs = front_door_pair(first, SECOND, "b")
    assert ours.modules_to_save == theirs.modules_to_save == ({"lm_head"} if saves else None)
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.active_peft_config.r == theirs.active_peft_config.r == first["r"]
    ours.set_adapter("b")
    theirs.set_adapter("b")
    assert ours.active_peft_config.r == theirs.active_peft_config.r == SECOND["r"]
    ours.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match=r"active_peft_config.*\['default', 'b'\]"):
        ours.active_peft_config  # noqa: B018 (peft fails too: a list is no dict key)


# ------------------------------------------------- 9. add_weighted_adapter's message
def test_combining_an_adapter_with_saved_modules_names_the_saved_modules():
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**SAVED))
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UserError, match=r"saves full modules \(\['lm_head'\]") as refused:
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mixed", "cat")
    assert "bias" not in str(refused.value)
    biased = get_peft_model(tiny_models.gpt2(), LoraConfig(**GPT2, bias="all"))
    biased.add_adapter("b", LoraConfig(**GPT2))
    with pytest.raises(UserError, match=r"trains biases \(bias='all'") as refused:
        biased.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mixed", "cat")
    assert "modules_to_save" not in str(refused.value)
