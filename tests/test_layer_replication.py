"""PEFT's ``layer_replication`` on a tiny random Llama (2 layers): copies of decoder layers that
share the base weights, each with its own adapter, against PEFT 0.21."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import TargetModulesError
from lorakit.io.summary import summarize_adapter
from lorakit.layers import LoraLinear
from tests.tiny_models import llama, randomize_adapters

LAYER_MAP = [[0, 2], [1, 2]]  # layers 0, 1 -> 0, 1, 1


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _config(**changes) -> lorakit.LoraConfig:
    values = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return lorakit.LoraConfig(**(values | {"layer_replication": LAYER_MAP} | changes))


def _peft_model(base):
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layer_replication=LAYER_MAP
    )
    return peft.get_peft_model(base, config)


def _adapted(seed: int = 3):
    model = lorakit.inject(llama(), _config())
    randomize_adapters(model, seed=seed, std=0.2)
    return model


def test_copies_share_the_base_weights_and_have_their_own_adapters() -> None:
    model = _adapted()
    layers = model.model.layers
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    first, copy_ = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert isinstance(first, LoraLinear) and isinstance(copy_, LoraLinear)
    assert first.base_layer.weight is copy_.base_layer.weight  # one base tensor
    assert layers[1].mlp.down_proj.weight is layers[2].mlp.down_proj.weight
    assert not torch.equal(first.lora_B["default"].weight, copy_.lora_B["default"].weight)
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]


def test_forward_equals_peft_with_the_same_nonzero_factors() -> None:
    model = _adapted()
    reference = _peft_model(llama())
    peft_state = reference.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                peft_state[f"base_model.model.{key}"].copy_(value)
    ids = _ids()
    actual = model(ids).logits
    torch.testing.assert_close(actual, reference(ids).logits, rtol=0, atol=1e-5)
    with lorakit.disabled(model):  # three layers of the base, not the base's two
        assert (model(ids).logits - llama()(ids).logits).abs().max() > 1e-3


def test_saved_adapter_loads_into_peft_and_back_with_equal_outputs(tmp_path) -> None:
    model = _adapted()
    lorakit.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["layer_replication"] == LAYER_MAP
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in keys
    summary = summarize_adapter(tmp_path / "ours")  # what lorakit inspect shows
    assert summary["layer_replication"] == LAYER_MAP and summary["adapted_modules"] == 6
    ids = _ids()
    expected = model(ids).logits
    by_peft = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    torch.testing.assert_close(by_peft(ids).logits, expected, rtol=0, atol=1e-5)
    by_peft.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        loaded = lorakit.load_adapter(llama(), tmp_path / "theirs")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
    reloaded = lorakit.load_adapter(llama(), tmp_path / "ours")  # fingerprint checked
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_merge_gives_each_copy_its_own_weight_and_unmerge_restores_the_shared_one() -> None:
    model = _adapted()
    ids = _ids()
    unmerged = model(ids).logits
    shared = model.model.layers[1].self_attn.q_proj.base_layer.weight
    lorakit.merge(model)
    first, copy_ = (model.model.layers[i].self_attn.q_proj.base_layer.weight for i in (1, 2))
    assert first is not copy_ and not torch.equal(first, copy_)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    assert model.model.layers[2].self_attn.q_proj.base_layer.weight is shared
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=0)
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert len(plain.model.layers) == 3
    torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_unload_restores_the_original_layers() -> None:
    base = llama()
    layers = base.model.layers
    lorakit.inject(base, _config())
    lorakit.unload(base)
    assert base.model.layers is layers and base.config.num_hidden_layers == 2
    torch.testing.assert_close(base(_ids()).logits, llama()(_ids()).logits, rtol=0, atol=0)


def test_a_second_adapter_uses_the_same_map_or_is_refused() -> None:
    model = _adapted()
    lorakit.inject(model, _config(r=4), "second")
    assert len(model.model.layers) == 3
    assert "second" in model.model.layers[2].self_attn.q_proj.ranks
    with pytest.raises(
        ValueError, match=r"replicated with layer_replication=\[\[0, 2\], \[1, 2\]\]"
    ):
        lorakit.inject(model, _config(layer_replication=[[0, 2]]), "third")


@pytest.mark.parametrize(
    ("layer_map", "message"),
    [([[0, 3]], r"\[0, 3\) is outside the 2 layers"), ([[1, 1]], "0 <= start < end")],
)
def test_bad_maps_are_refused_and_leave_the_model_alone(layer_map, message) -> None:
    model = llama()
    with pytest.raises(ValueError, match=message):
        lorakit.inject(model, _config(layer_replication=layer_map))
    assert len(model.model.layers) == 2 and "lorakit_state" not in model.__dict__


def test_a_failed_injection_undoes_the_replication() -> None:
    model = llama()
    with pytest.raises(TargetModulesError, match="q_prj"):  # one entry matches, one does not
        lorakit.inject(model, _config(target_modules=["q_proj", "q_prj"]))
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2


def test_a_failed_load_leaves_the_layers_as_they_were(tmp_path) -> None:
    lorakit.save_adapter(_adapted(), tmp_path)
    other = llama(seed=7)
    with pytest.raises(lorakit.BaseModelMismatchError):
        lorakit.load_adapter(other, tmp_path)
    assert len(other.model.layers) == 2 and other.config.num_hidden_layers == 2
    assert "lorakit_state" not in other.__dict__


def test_combine_serving_and_gguf_export_refuse_replicated_adapters(tmp_path) -> None:
    from lorakit.errors import AdapterFileError, UserError
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.serve.checks import lora_pairs

    model = _adapted()
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(UserError, match="layer_replication"):
        lorakit.combine([str(tmp_path), str(tmp_path)])
    with pytest.raises(AdapterFileError, match="layer_replication"):
        lora_pairs("copies", _config(), load_file(tmp_path / "adapter_model.safetensors"), {}, 8)
    with pytest.raises(UserError, match="layer_replication"):
        export_adapter(tmp_path, llama(), tmp_path / "out.gguf")
