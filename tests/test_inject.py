"""``lorakit.inject``'s building blocks that other modules reuse: wrapping targets without an
adapter (serving), freezing one adapter (PEFT's inference mode), the adapter dtype rule."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import TargetModulesError
from lorakit.inject import freeze_adapter
from lorakit.layer_wrapping import default_adapter_dtype, wrap_targets
from lorakit.layers import LoraLayer, LoraLinear
from lorakit.serve import AdapterBank, prepare_for_serving
from tests import tiny_models

QV = lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])


def _logits(model):
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def test_wrap_targets_wraps_without_an_adapter_and_unload_restores_everything() -> None:
    model = tiny_models.llama().eval()
    original = model.model.layers[0].self_attn.q_proj
    expected = _logits(model)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    layers = wrap_targets(model, names)
    assert list(layers) == names
    assert all(isinstance(layer, LoraLinear) and layer.ranks == {} for layer in layers.values())
    assert model.model.layers[0].self_attn.q_proj.base_layer is original
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in layers["model.layers.0.self_attn.q_proj"].modules())
    assert lorakit.adapter_configs(model) == {}
    assert torch.equal(_logits(model), expected)
    assert wrap_targets(model, names[:1]) == {names[0]: layers[names[0]]}  # kept, not re-wrapped
    lorakit.unload(model)
    assert model.model.layers[0].self_attn.q_proj is original
    assert all(p.requires_grad for p in model.parameters())


def test_wrap_targets_checks_every_module_before_changing_any() -> None:
    model = tiny_models.llama()
    with pytest.raises(TargetModulesError, match=r"'model\.norm'"):
        wrap_targets(model, ["model.layers.0.self_attn.q_proj", "model.norm"])
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert lorakit.adapter_configs(model) == {} and "lorakit_state" not in model.__dict__


def test_prepare_for_serving_adds_no_adapter_at_all(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("serving must not create adapter tensors")

    monkeypatch.setattr(LoraLayer, "add_adapter", refuse)
    model = tiny_models.llama()
    assert prepare_for_serving(model, ["q_proj", "v_proj"]) == 4
    assert lorakit.adapter_configs(model) == {} and lorakit.active_adapters(model) == ()
    with pytest.raises(ValueError, match="match"):
        prepare_for_serving(tiny_models.llama(), ["no_such_module"])


def test_freeze_adapter_freezes_that_adapter_only_wherever_it_lives() -> None:
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = lorakit.inject(tiny_models.llama(), config, adapter_name="a")
    other = config.replace(modules_to_save=["model.norm"])  # (one copy of a module at a time)
    lorakit.inject(model, other, adapter_name="b")
    lorakit.set_active(model, ["a", "b"])
    freeze_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n or n.endswith(".b") for n in trainable)
    assert any("modules_to_save.b." in n for n in trainable)
    assert not any(".a." in n for n in trainable)
    freeze_adapter(model, "b", ["model.layers.0.self_attn.q_proj"])  # only where told
    assert not model.model.layers[0].self_attn.q_proj.lora_A["b"].weight.requires_grad
    assert model.model.layers[1].self_attn.q_proj.lora_A["b"].weight.requires_grad


@pytest.mark.parametrize(
    ("base", "adapter"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_injected_adapters_and_the_serving_bank_follow_one_dtype_rule(base, adapter) -> None:
    assert default_adapter_dtype(base) == adapter
    injected = lorakit.inject(tiny_models.llama(dtype=base), QV)
    layer = injected.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == adapter
    served = tiny_models.llama(dtype=base)
    prepare_for_serving(served, ["q_proj"])
    assert AdapterBank(served, max_rank=2, capacity=1).dtype == adapter
