"""Merge review fixes, session 29.

1. ``trainable_token_indices`` on an embedding tied to the output layer is refused however the
   output layer is wrapped now: a merged LoRA layer (its live weight is the merged Parameter,
   ``unmerge`` ties it again) or another adapter's ``modules_to_save`` wrapper (no ``weight``).
   ``inject`` and ``load_adapter`` decide by the same rule; an untied model is still accepted.
2. ``delete_adapter`` of a merged adapter is all or nothing: every layer's re-merge of the
   other merged adapters is computed and checked before any layer changes, so a remaining
   adapter holding NaN leaves every layer and the configs exactly as they were, and the error
   names the module; a normal delete still equals a model that only had the other adapter.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io import load_adapter, save_adapter
from lorakit.layers import TrainableTokens
from lorakit.state import lora_layers
from tests import tiny_models

TIED = "tied to the output layer"
NAN_LAYER = "model.layers.1.self_attn.q_proj"


def _llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=tied)).eval()


def _tokens(**fields) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(
        **(dict(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 17]) | fields)
    )


def _lm_head_lora_merged(tied: bool) -> LlamaForCausalLM:
    model = _llama(tied)
    config = lorakit.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    lorakit.inject(model, config, "a")
    lorakit.merge(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied while merged
    return model


def _lm_head_saved(tied: bool) -> LlamaForCausalLM:
    model = _llama(tied)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    return lorakit.inject(model, config, "a")


def _embedding_lora_merged(tied: bool) -> LlamaForCausalLM:
    model = _llama(tied)
    config = lorakit.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    lorakit.inject(model, config, "a")
    lorakit.merge(model)
    return model


# ----------------------------------------------------------------- 1. tied embeddings


@pytest.mark.parametrize("prepare", [_lm_head_lora_merged, _lm_head_saved])
def test_tokens_on_a_tied_embedding_are_refused_however_lm_head_is_wrapped(prepare):
    model = prepare(tied=True)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=TIED) as error:
        lorakit.inject(model, _tokens(), "b")
    assert "'model.embed_tokens'" in str(error.value)
    assert dict(model.named_modules()) == before
    assert list(lorakit.adapter_configs(model)) == ["a"]


def test_tokens_on_a_tied_embedding_whose_own_lora_is_merged_are_refused():
    model = _embedding_lora_merged(tied=True)
    with pytest.raises(ValueError, match=TIED):
        lorakit.inject(model, _tokens(trainable_token_indices={"embed_tokens": [5]}), "b")
    assert list(lorakit.adapter_configs(model)) == ["a"]


@pytest.mark.parametrize("prepare", [_lm_head_lora_merged, _lm_head_saved])
def test_load_adapter_refuses_tokens_on_a_tied_embedding_by_the_same_rule(prepare, tmp_path):
    save_adapter(lorakit.inject(_llama(tied=False), _tokens(), "b"), tmp_path, "b")
    for model in (_llama(tied=True), prepare(tied=True)):  # fresh, and wrapped now
        with pytest.raises(AdapterFileError, match=TIED):
            load_adapter(model, tmp_path, "b")


@pytest.mark.parametrize("prepare", [_lm_head_lora_merged, _lm_head_saved])
def test_tokens_on_an_untied_embedding_are_still_accepted(prepare):
    model = prepare(tied=False)
    lorakit.inject(model, _tokens(init_lora_weights=False), "b")
    assert isinstance(model.model.embed_tokens, TrainableTokens)
    rows = model.model.embed_tokens.modules_to_save["b"].values
    ids = torch.tensor([[5, 17, 3, 5, 9]])
    lorakit.set_active(model, ["b"])
    with torch.no_grad():
        before = model(ids).logits
        rows.add_(1.0)
        after = model(ids).logits
    assert (after - before).abs().max().item() > 1e-3  # the rows are used


# ----------------------------------------------------------------- 2. delete_adapter


def _base(fields: dict) -> LlamaForCausalLM:
    """The tiny Llama; with biases on the attention projections for a ``lora_bias`` adapter
    (merging one needs a base bias to add it to)."""
    torch.manual_seed(0)
    bias = bool(fields.get("lora_bias"))
    return LlamaForCausalLM(tiny_models.llama_config(attention_bias=bias)).eval()


def _two_merged(**fields) -> LlamaForCausalLM:
    model = _base(fields)
    fields = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) | fields
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        lorakit.inject(model, lorakit.LoraConfig(**fields), name)
    lorakit.set_active(model, ["a", "b"])
    return lorakit.merge(model)


def _snapshot(model) -> dict:
    """Every layer's adapters, active and merged sets, merge state and live weight (the object),
    every tensor's bits (NaN included), and the adapter configs."""
    layers = {
        path: (
            tuple(layer.ranks),
            layer.active_adapters,
            layer.merged_adapters,
            layer._merge_state,
            layer.base_layer.weight,
        )
        for path, layer in lora_layers(model)
    }
    tensors = {
        name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()
    }
    configs = dict(lorakit.adapter_configs(model))
    return dict(layers=layers, tensors=tensors, configs=configs)


def _assert_same(model, snapshot: dict) -> None:
    now = _snapshot(model)
    assert now["configs"] == snapshot["configs"]
    assert now["layers"].keys() == snapshot["layers"].keys()
    for path, (*names, state, weight) in snapshot["layers"].items():
        *now_names, now_state, now_weight = now["layers"][path]
        assert now_names == names, path
        assert now_state is state and now_weight is weight, path
    assert now["tensors"].keys() == snapshot["tensors"].keys()
    for name, tensor in snapshot["tensors"].items():
        torch.testing.assert_close(now["tensors"][name], tensor, rtol=0, atol=0, equal_nan=True)


def test_delete_of_a_merged_adapter_refused_by_the_remerge_changes_nothing():
    model = _two_merged()
    with torch.no_grad():
        model.get_submodule(NAN_LAYER).lora_B["a"].weight.fill_(float("nan"))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="non-finite") as error:
        lorakit.delete_adapter(model, "b")
    assert f"module {NAN_LAYER!r}" in str(error.value)
    _assert_same(model, snapshot)
    assert list(lorakit.adapter_configs(model)) == ["a", "b"]
    for _, layer in lora_layers(model):
        assert layer.merged_adapters == ("a", "b")


def test_one_layer_delete_refused_by_the_remerge_leaves_the_layer_as_it_was():
    model = _two_merged()
    layer = model.get_submodule(NAN_LAYER)
    with torch.no_grad():
        layer.lora_B["a"].weight.fill_(float("nan"))
    state, weight = layer._merge_state, layer.base_layer.weight
    with pytest.raises(ValueError, match="non-finite"):
        layer.delete_adapter("b")
    assert layer._merge_state is state and layer.base_layer.weight is weight
    assert tuple(layer.ranks) == ("a", "b") and "b" in layer.lora_A


@pytest.mark.parametrize(
    "fields", [{}, dict(use_dora=True), dict(lora_bias=True)], ids=["lora", "dora", "lora_bias"]
)
def test_delete_of_a_merged_adapter_equals_a_model_that_only_had_the_other(fields):
    model = _two_merged(**fields)
    originals = {path: layer.original_weight for path, layer in lora_layers(model)}
    lorakit.delete_adapter(model, "b")

    reference = _base(fields)
    config = lorakit.LoraConfig(
        **(dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) | fields)
    )
    torch.manual_seed(1)
    lorakit.inject(reference, config, "a")
    lorakit.merge(reference, ["a"])

    assert list(lorakit.adapter_configs(model)) == ["a"]
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    for _, layer in lora_layers(model):
        assert layer.merged_adapters == ("a",) and tuple(layer.ranks) == ("a",)
    lorakit.unmerge(model)
    for path, layer in lora_layers(model):
        assert layer.base_layer.weight is originals[path]  # the original Parameter is back
    ids = tiny_models.input_ids()
    lorakit.merge(model, ["a"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_delete_of_the_only_merged_adapter_restores_the_original_weight():
    model = _two_merged()
    lorakit.unmerge(model)
    originals = {path: layer.base_layer.weight for path, layer in lora_layers(model)}
    lorakit.merge(model, ["b"])
    lorakit.delete_adapter(model, "b")
    for path, layer in lora_layers(model):
        assert layer.merged_adapters == () and layer.base_layer.weight is originals[path]
