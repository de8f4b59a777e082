"""Named adapters: several on one model, active sets, per-call choice, disabling, deleting,
unloading — checked against float64 references and the untouched base model."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit.state import lora_layers
from tests import tiny_models
from tests.call_count import calls_made

CONFIG = lorakit.LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def two_adapters():
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    lorakit.inject(model, CONFIG.replace(r=2, lora_alpha=6), "second", activate=False)
    tiny_models.randomize_adapters(model, std=0.2)
    return model


def test_layer_output_is_base_plus_sum_of_active_adapters_in_float64(two_adapters) -> None:
    lorakit.set_active(two_adapters, ["default", "second"])
    layer = two_adapters.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    expected = x.double() @ layer.base_layer.weight.double().T
    for name in ("default", "second"):
        lora_A = layer.lora_A[name].weight.double()
        lora_B = layer.lora_B[name].weight.double()
        expected += layer.scalings[name] * x.double() @ (lora_B @ lora_A).T
    assert layer.scalings == {"default": 2.0, "second": 3.0}
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_new_adapter_is_not_active_unless_asked(two_adapters) -> None:
    assert lorakit.active_adapters(two_adapters) == ("default",)
    trainable = {n for n, p in two_adapters.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    lorakit.set_active(two_adapters, ["second"])
    trainable = {n for n, p in two_adapters.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)


def test_disabled_gives_the_base_output_exactly_even_while_merged(two_adapters) -> None:
    ids = tiny_models.input_ids()
    base = _logits(tiny_models.llama(), ids)
    weights = {n: p.clone() for n, p in two_adapters.named_parameters()}
    with lorakit.disabled(two_adapters):
        assert torch.equal(_logits(two_adapters, ids), base)
    lorakit.merge(two_adapters)
    with lorakit.disabled(two_adapters):
        assert torch.equal(_logits(two_adapters, ids), base)
    lorakit.unmerge(two_adapters)
    assert all(torch.equal(weights[n], p) for n, p in two_adapters.named_parameters())
    assert not torch.equal(_logits(two_adapters, ids), base)


def test_use_adapters_chooses_per_call_without_changing_the_model(two_adapters) -> None:
    ids = tiny_models.input_ids()
    default_out = _logits(two_adapters, ids)
    with lorakit.use_adapters(two_adapters, ["second"]):
        second_out = _logits(two_adapters, ids)
    lorakit.set_active(two_adapters, ["second"])
    assert torch.equal(_logits(two_adapters, ids), second_out)
    lorakit.set_active(two_adapters, ["default"])
    assert torch.equal(_logits(two_adapters, ids), default_out)
    with (
        pytest.raises(KeyError, match="unknown adapter"),
        lorakit.use_adapters(two_adapters, ["missing"]),
    ):
        pass


def test_use_adapters_is_confined_to_its_thread(two_adapters) -> None:
    ids = tiny_models.input_ids()
    default_out = _logits(two_adapters, ids)
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def other_thread() -> None:
        inside.wait()
        seen["other"] = _logits(two_adapters, ids)
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with lorakit.use_adapters(two_adapters, []):
        inside.set()
        release.wait(timeout=30)
    worker.join()
    assert torch.equal(seen["other"], default_out)


def test_use_adapters_and_disabled_touch_only_their_model(two_adapters) -> None:
    """Choosing adapters for one model leaves another model in the same block alone (both
    models have an adapter named "default"; once the choice leaked to every model)."""
    other = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(other, seed=3, std=0.2)
    ids = tiny_models.input_ids()
    other_out, base = _logits(other, ids), _logits(tiny_models.llama(), ids)
    with lorakit.use_adapters(two_adapters, ["second"]), lorakit.disabled(two_adapters):
        assert torch.equal(_logits(two_adapters, ids), base)
        assert torch.equal(_logits(other, ids), other_out)
    with lorakit.use_adapters(two_adapters, []), lorakit.use_adapters(other, ["default"]):
        assert torch.equal(_logits(two_adapters, ids), base)
        assert torch.equal(_logits(other, ids), other_out)
    with lorakit.disabled(other):
        assert torch.equal(_logits(other, ids), base)
        assert not torch.equal(_logits(two_adapters, ids), base)
    assert not torch.equal(other_out, base)


def test_delete_adapter_removes_its_tensors(two_adapters) -> None:
    lorakit.delete_adapter(two_adapters, "second")
    assert list(lorakit.adapter_configs(two_adapters)) == ["default"]
    assert not any(".second." in n for n, _ in two_adapters.named_parameters())
    with pytest.raises(KeyError):
        lorakit.set_active(two_adapters, ["second"])


def test_unload_puts_back_the_same_objects_and_trainability() -> None:
    model = tiny_models.llama()
    originals = {name: m for name, m in model.named_modules() if name.endswith("q_proj")}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.inject(model, CONFIG)
    tiny_models.randomize_adapters(model)
    lorakit.merge(model)
    lorakit.unload(model)
    for name, module in originals.items():
        assert model.get_submodule(name) is module
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    ids = tiny_models.input_ids()
    assert torch.equal(_logits(model, ids), _logits(tiny_models.llama(), ids))


def test_duplicate_or_bad_adapter_names_are_refused(two_adapters) -> None:
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        lorakit.inject(two_adapters, CONFIG, "second")
    with pytest.raises(ValueError, match=r"adapter_name='a\.b'"):
        lorakit.inject(two_adapters, CONFIG, "a.b")


def test_bias_modes_choose_the_trainable_biases() -> None:
    model = tiny_models.bert()
    config = lorakit.LoraConfig(target_modules=["query"], bias="lora_only")
    lorakit.inject(model, config)
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {
        f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)
    }
    model = lorakit.inject(tiny_models.bert(), config.replace(bias="all"))
    trainable_biases = [
        n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")
    ]
    all_biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert trainable_biases == all_biases


def test_adapter_tensors_follow_the_base_device_and_fp32_for_half_bases() -> None:
    model = lorakit.inject(tiny_models.llama(dtype=torch.bfloat16), CONFIG)
    layer = next(layer for _, layer in lora_layers(model))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_activating_costs_the_same_with_100_adapters_as_with_2() -> None:
    """set_active touches the adapters it switches, not every parameter of the model."""
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    lorakit.inject(model, CONFIG, "a1", activate=False)
    with_two = calls_made(lorakit.set_active, model, ["a1"])
    for index in range(2, 100):
        lorakit.inject(model, CONFIG, f"a{index}", activate=False)
    with_hundred = calls_made(lorakit.set_active, model, ["a99"])
    assert with_hundred == with_two
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a99." in n for n in trainable)
