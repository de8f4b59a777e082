"""PEFT behaviours of the ``PeftModel`` front door, against the real ``peft`` package as the
oracle: per-row ``adapter_names=`` (mixed-batch inference, forward and generate), deleting the
active adapter, ``merge_adapter`` of an adapter that is not active, and lorakit's top-level
functions given the wrapper."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, get_peft_model
from tests import tiny_models
from tests.peft_pairs import front_door_pair

FIRST = dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
SECOND = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.fixture
def pair():
    """lorakit's and peft's PeftModel with the same two adapters ('default' active, 'b')."""
    return front_door_pair(FIRST, SECOND, "b")


def _alone(model, ids: torch.Tensor, name: str, generate: bool = False) -> torch.Tensor:
    """``ids`` run with adapter ``name`` alone (``__base__``: none), through lorakit's own API."""
    names = [] if name == "__base__" else [name]
    with torch.no_grad(), lorakit.use_adapters(model.model, names):
        return model.generate(ids, **GREEDY) if generate else model(ids).logits


# ---------------------------------------------------------------- adapter_names= (mixed batch)
def test_adapter_names_routes_each_row_like_peft_and_like_the_adapter_alone(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids(batch=4)
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        mixed = ours(ids, adapter_names=names).logits
        peft_mixed = theirs(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, peft_mixed, rtol=1e-5, atol=1e-5)
    for row, name in enumerate(names):
        torch.testing.assert_close(
            mixed[row], _alone(ours, ids[row : row + 1], name)[0], rtol=1e-5, atol=1e-5
        )
    assert (mixed[0] - _alone(ours, ids[:1], "default")[0]).abs().max() > 1e-3  # routed
    assert ours.active_adapters == ["default"]  # nothing on the model changed


def test_adapter_names_in_greedy_generate_like_peft_and_like_the_adapter_alone(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids(batch=3, length=6)
    names = ["default", "b", "__base__"]
    with torch.no_grad():
        generated = ours.generate(ids, adapter_names=names, **GREEDY)
        peft_generated = theirs.generate(input_ids=ids, adapter_names=names, **GREEDY)
    assert torch.equal(generated, peft_generated)
    for row, name in enumerate(names):
        alone = _alone(ours, ids[row : row + 1], name, generate=True)
        assert torch.equal(generated[row : row + 1], alone)


def test_adapter_names_refusals(pair):
    ours, _ = pair
    ids = tiny_models.input_ids(batch=2)
    with pytest.raises(ValueError, match="nope"):
        ours(ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="nope"):
        ours.generate(ids, adapter_names=["nope", "b"], **GREEDY)
    with pytest.raises(ValueError, match="one adapter name per row"):
        ours(ids, adapter_names=["default"])
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(ids, adapter_names=["default", "b"])
    ours.eval()
    ours.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        ours(ids, adapter_names=["default", "b"])


def test_adapter_names_refused_where_row_routing_cannot_apply():
    """An adapter on an embedding (not a linear layer): the per-row routing does not cover it,
    so the keyword is refused (never ignored) and the per-call alternative is named."""
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**FIRST))
    ours.add_adapter("emb", LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    ours.eval()
    with pytest.raises(TypeError, match=r"adapter_names.*use_adapters"):
        ours(tiny_models.input_ids(), adapter_names=["emb", "default"])


# ---------------------------------------------------------------- delete_adapter
def _after_deleting(library, active, deleted):
    torch.manual_seed(0)
    m = library.get_peft_model(tiny_models.llama(), library.LoraConfig(**FIRST))
    m.add_adapter("b", library.LoraConfig(**SECOND))
    m.add_adapter("a", library.LoraConfig(**FIRST))
    if library is peft and len(active) > 1:
        m.base_model.set_adapter(active)  # (peft's PeftModel.set_adapter takes one name)
    else:
        m.set_adapter(active[0] if library is peft else active)
    with pytest.warns(UserWarning) if library is lorakit and len(active) == 1 else _no_check():
        m.delete_adapter(deleted)
    return m


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "active, deleted", [(["b"], "b"), (["default"], "default"), (["a", "b"], "b")]
)
def test_delete_active_adapter_switches_like_peft(active, deleted):
    ours = _after_deleting(lorakit, active, deleted)
    theirs = _after_deleting(peft, active, deleted)
    assert ours.active_adapters == theirs.active_adapters == ["a"]
    trainable = {n for n, p in ours.model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in name for name in trainable)  # 'a' trains, all of it
    theirs_trainable = {n for n, p in theirs.model.named_parameters() if p.requires_grad}
    if deleted == "b":
        assert trainable == theirs_trainable
    else:  # peft picks per layer: the v_proj layers (without 'a') switch to 'b' there
        assert trainable == {n for n in theirs_trainable if ".a." in n}
    ids = tiny_models.input_ids()
    with torch.no_grad():
        ours.eval()
        with lorakit.use_adapters(ours.model, ["a"]):
            expected = ours(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected)
        assert (expected - tiny_models.llama()(ids).logits).abs().max() > 1e-3


# ---------------------------------------------------------------- merge_adapter(names)
def test_merge_adapter_of_an_inactive_adapter_computes_it_like_peft(pair):
    ours, theirs = pair
    ids = tiny_models.input_ids()
    with torch.no_grad():
        only_default = ours(ids).logits
        only_b = _alone(ours, ids, "b")
        for model in (ours, theirs):
            model.merge_adapter(["b"])
        merged = ours(ids).logits
        torch.testing.assert_close(merged, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged, only_b, rtol=1e-5, atol=1e-5)
        for model in (ours, theirs):
            model.unmerge_adapter()
        unmerged = ours(ids).logits
        torch.testing.assert_close(unmerged, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unmerged, only_default, rtol=1e-5, atol=1e-5)
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# ---------------------------------------------------------------- top-level functions on the wrapper
def test_top_level_functions_see_the_adapters_of_the_wrapper(pair, tmp_path):
    ours, _ = pair
    ids = tiny_models.input_ids()
    assert lorakit.active_adapters(ours) == ("default",)
    assert list(lorakit.adapter_configs(ours)) == ["default", "b"]
    with torch.no_grad():
        with lorakit.use_adapters(ours, ["b"]):
            via_wrapper = ours(ids).logits
        torch.testing.assert_close(via_wrapper, _alone(ours, ids, "b"))
        with lorakit.disabled(ours):
            base = ours(ids).logits
        torch.testing.assert_close(base, tiny_models.llama()(ids).logits)
    lorakit.save_adapter(ours, tmp_path, "b")  # (into tmp_path/b, PEFT's layout)
    reference = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, via_wrapper)
    lorakit.set_active(ours, ["b"])
    assert ours.active_adapters == ["b"]
    lorakit.inject(ours, LoraConfig(r=2, target_modules=["k_proj"]), "c")
    assert "lorakit_state" not in ours.__dict__  # no second, hidden state on the wrapper
    assert list(ours.peft_config) == ["default", "b", "c"]
    assert list(lorakit.adapter_configs(ours.model)) == ["default", "b", "c"]
    assert lorakit.active_adapters(ours) == ("c",)
    lorakit.delete_adapter(ours, "c")
    assert list(ours.peft_config) == ["default", "b"]
