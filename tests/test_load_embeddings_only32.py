"""An adapter whose only LoRA modules are the (resized) embeddings, saved with
``save_embedding_layers=True``, brings the base weight of every module it adapts: the fingerprint
check leaves those out, so nothing of the base is checked. ``load_adapter`` must warn that it
cannot verify the base (it used to load silently onto any base of the same shapes); an adapter
that also adapts ``q_proj`` is still refused on another base, and a normal load stays silent."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from lorakit.errors import BaseModelMismatchError
from tests import tiny_models

VOCAB = 160  # the tiny Llama's 128 tokens, resized


def _resized_llama(seed: int) -> torch.nn.Module:
    model = tiny_models.llama(seed)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    return model


def _trained(directory, targets: list[str], seed: int = 0, resize: bool = True) -> torch.nn.Module:
    """A base of ``seed`` with a random adapter on ``targets``, saved to ``directory`` with the
    embedding base weights; returns the trained model."""
    model = _resized_llama(seed) if resize else tiny_models.llama(seed)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, directory, save_embedding_layers=resize)
    return model


def _load_recording(model, directory) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(model, directory)
    return list(caught)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids(vocab=VOCAB)).logits


def test_embeddings_only_adapter_on_another_base_warns_that_it_cannot_verify(tmp_path) -> None:
    trained = _trained(tmp_path, ["embed_tokens", "lm_head"])
    other = _resized_llama(seed=7)
    caught = _load_recording(other, tmp_path)
    notes = [w for w in caught if "cannot verify" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    message = str(notes[0].message)
    assert str(tmp_path) in message
    assert "lm_head, model.embed_tokens" in message and "save_embedding_layers" in message
    assert notes[0].category is UserWarning and notes[0].filename == __file__  # the caller's line
    # it did load: the file's tables are the base now, yet the rest of the base is another one
    for name in ("model.embed_tokens", "lm_head"):
        mine = other.get_submodule(name).base_layer.weight
        assert torch.equal(mine, trained.get_submodule(name).base_layer.weight)
    assert (_logits(other) - _logits(trained)).abs().max().item() > 0.1


def test_embeddings_only_adapter_warns_on_its_own_base_too(tmp_path) -> None:
    trained = _trained(tmp_path, ["embed_tokens", "lm_head"])
    same = _resized_llama(seed=0)
    caught = _load_recording(same, tmp_path)
    assert sum("cannot verify" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(_logits(same), _logits(trained), rtol=0, atol=1e-5)


def test_embeddings_and_q_proj_adapter_is_still_refused_on_another_base(tmp_path) -> None:
    _trained(tmp_path, ["embed_tokens", "lm_head", "q_proj"])
    other = _resized_llama(seed=7)
    before = {name: p.detach().clone() for name, p in other.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BaseModelMismatchError, match=r"'model\.layers\.0\.self_attn\.q_proj'"):
            lorakit.load_adapter(other, tmp_path)
    assert not [str(w.message) for w in caught if "cannot verify" in str(w.message)]
    after = dict(other.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # left unchanged


def test_embeddings_and_q_proj_adapter_on_its_own_base_loads_silently(tmp_path) -> None:
    trained = _trained(tmp_path, ["embed_tokens", "lm_head", "q_proj"])
    same = _resized_llama(seed=0)
    assert [str(w.message) for w in _load_recording(same, tmp_path)] == []
    torch.testing.assert_close(_logits(same), _logits(trained), rtol=0, atol=1e-5)


def test_normal_adapter_on_its_own_base_loads_without_warning(tmp_path) -> None:
    trained = _trained(tmp_path, ["q_proj", "v_proj"], resize=False)
    same = tiny_models.llama(seed=0)
    assert [str(w.message) for w in _load_recording(same, tmp_path)] == []
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)
