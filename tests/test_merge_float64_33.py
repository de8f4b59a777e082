"""Merging on a float64 model computes ``W0 + s B A`` in float64 (as PEFT's ``merge_adapter``),
not through float32; on float32 / bfloat16 bases the merge is the float32 sum, rounded once, as
before.

Every float64 base here holds values float32 cannot represent (float64 noise added), and every
adapter float64 random values with B != 0, so a merge rounded through float32 is off by ~1e-8
(what these tests caught) where the float64 formula is exact to the last bit or two.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.state import lora_layers
from tests import tiny_models

F64 = torch.float64


def _f64(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """``model`` in float64, each weight moved by float64 noise (no longer float32 numbers)."""
    model = model.to(F64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=F64) * 1e-3)
    return model


def _randomize(model: torch.nn.Module, seed: int = 3) -> None:
    """Every adapter tensor (A, B, a DoRA magnitude) float64 random, B != 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for parameter in layer.adapter_parameters("default"):
                noise = torch.randn(parameter.shape, generator=generator, dtype=F64) * 0.1
                parameter.copy_(noise + (1.0 if parameter.dim() == 1 else 0.0))  # m near 1


def _ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def _factors(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    A, B = (p.detach() for p in layer.adapter_parameters("default")[:2])
    return A, B, layer.scalings["default"]


def _assert_f64_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within 1e-15 of the weight's size (a float32 round trip is off by ~1e-8)."""
    assert got.dtype == want.dtype == F64
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error <= 1e-15, error


def _weights(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The base weights by plain module path (LoRA tensors left out, ``base_layer`` dropped)."""
    return {
        key.removeprefix(prefix).replace(".base_layer", ""): value
        for key, value in model.state_dict().items()
        if "lora_" not in key
    }


def _peft_merged(base: torch.nn.Module, model: torch.nn.Module, **config) -> dict:
    """PEFT's ``merge_adapter`` weights on ``base`` with ``model``'s adapter tensors."""
    reference = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, **config))
    state = reference.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "lora_" in key:
                state[f"base_model.model.{key}"].copy_(value)
    reference.merge_adapter()
    return _weights(reference, "base_model.model.")


def _merge_checked(model, expected: dict[str, torch.Tensor], ids, exact: bool) -> dict:
    """Merge ``model``: each weight in ``expected`` equals it (bit for bit when ``exact``), the
    merged logits equal the unmerged ones within float64 rounding, and unmerging gives back the
    original weights bit for bit (two cycles). Returns the merged weights."""
    originals = {key: value.clone() for key, value in _weights(model).items()}
    unmerged = model(ids).logits
    for _ in range(2):
        lorakit.merge(model)
        merged = {key: value.clone() for key, value in _weights(model).items()}
        for key, want in expected.items():
            if exact:
                assert torch.equal(merged[key], want), key
            else:
                _assert_f64_close(merged[key], want)
        error = (model(ids).logits - unmerged).abs().max().item()
        assert error < 1e-12, error  # through float32 it was ~4e-8
        lorakit.unmerge(model)
        for key, value in _weights(model).items():
            assert torch.equal(value, originals[key]), key
    return merged


def test_float64_linear_merge_is_the_float64_formula_and_peft_s():
    base = _f64(tiny_models.llama())
    model = lorakit.inject(
        copy.deepcopy(base),
        lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
    )
    _randomize(model)
    expected = {}
    for path, layer in lora_layers(model):
        A, B, scale = _factors(layer)
        expected[f"{path}.weight"] = layer.base_layer.weight.detach() + (B @ A) * scale
    merged = _merge_checked(model, expected, _ids(), exact=True)
    oracle = _peft_merged(base, model, target_modules=["q_proj", "down_proj"])
    for key in expected:
        assert torch.equal(merged[key], oracle[key]), key


def test_float64_conv1d_merge_is_the_float64_formula_and_peft_s():
    """GPT-2's ``Conv1D`` stores (in, out): the delta is ``s (B A)^T``."""
    base = _f64(tiny_models.gpt2())
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    model = lorakit.inject(copy.deepcopy(base), config)
    _randomize(model)
    expected = {}
    for path, layer in lora_layers(model):
        A, B, scale = _factors(layer)
        expected[f"{path}.weight"] = layer.base_layer.weight.detach() + ((B @ A) * scale).T
    merged = _merge_checked(model, expected, _ids(), exact=True)
    oracle = _peft_merged(base, model, target_modules=["c_attn"], fan_in_fan_out=True)
    for key in expected:
        assert torch.equal(merged[key], oracle[key]), key


def test_float64_embedding_merge_is_the_float64_formula_and_peft_s():
    """An embedding's delta is ``s (B A)^T`` (A (r, num), B (dim, r))."""
    base = _f64(tiny_models.llama())
    model = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"])
    )
    _randomize(model)
    layer = model.model.embed_tokens
    A, B, scale = _factors(layer)
    key = "model.embed_tokens.weight"
    expected = {key: layer.base_layer.weight.detach() + ((B @ A) * scale).T}
    merged = _merge_checked(model, expected, _ids(), exact=True)
    oracle = _peft_merged(base, model, target_modules=["embed_tokens"])
    assert torch.equal(merged[key], oracle[key])


def test_float64_dora_merge_is_the_float64_formula_and_peft_s():
    """DoRA: ``W = m / ||W0 + s B A||_row * (W0 + s B A)``, all in float64."""
    base = _f64(tiny_models.llama())
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], use_dora=True)
    model = lorakit.inject(copy.deepcopy(base), config)
    _randomize(model)
    expected = {}
    for path, layer in lora_layers(model):
        A, B, scale = _factors(layer)
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        adapted = layer.base_layer.weight.detach() + (B @ A) * scale
        expected[f"{path}.weight"] = (magnitude / adapted.norm(dim=1))[:, None] * adapted
    merged = _merge_checked(model, expected, _ids(), exact=False)
    oracle = _peft_merged(base, model, target_modules=["v_proj"], use_dora=True)
    for key in expected:
        _assert_f64_close(merged[key], oracle[key])


def _expert_delta(A: torch.Tensor, B: torch.Tensor, scale: float, experts: int) -> torch.Tensor:
    """PEFT's layout, expert by expert: ``s B[:, e::E] @ A[e r:(e + 1) r]`` (E, d, k)."""
    rank = A.shape[0] // experts
    blocks = [B[:, e::experts] @ A[e * rank : (e + 1) * rank] for e in range(experts)]
    return torch.stack(blocks) * scale


def test_float64_expert_parameter_merge_is_the_float64_formula_and_peft_s():
    """``target_parameters`` (Mixtral's fused (E, d, k) experts) beside an ``nn.Linear``."""
    base = _f64(tiny_models.mixtral())
    base.config._experts_implementation = "eager"  # grouped_mm takes no float64
    targets = dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, lora_alpha=4, **targets))
    _randomize(model)
    expected = {}
    for path, layer in lora_layers(model):
        A, B, scale = _factors(layer)
        if path.endswith("q_proj"):
            expected[f"{path}.weight"] = layer.base_layer.weight.detach() + (B @ A) * scale
        else:
            W0 = layer.live_weight().detach()
            expected[f"{path}.gate_up_proj"] = W0 + _expert_delta(A, B, scale, W0.shape[0])
    assert len(expected) == 4
    merged = _merge_checked(model, expected, _ids(), exact=False)
    oracle = _peft_merged(base, model, **targets)
    for key in expected:
        _assert_f64_close(merged[key], oracle[key])


def test_float64_merge_and_unload_keeps_the_float64_sum():
    base = _f64(tiny_models.llama())
    model = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    _randomize(model)
    layer = model.model.layers[1].self_attn.q_proj
    A, B, scale = _factors(layer)
    expected = layer.base_layer.weight.detach() + (B @ A) * scale
    unloaded = lorakit.merge_and_unload(model)
    assert torch.equal(unloaded.model.layers[1].self_attn.q_proj.weight, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrower_bases_keep_the_float32_sum_rounded_once(dtype):
    """Unchanged on float32 / bfloat16 bases: ``(W0 in float32 + s B A in float32)`` rounded
    once to the base dtype, bit for bit (the float64 expert formula and DoRA aside)."""
    model = lorakit.inject(
        tiny_models.llama(dtype=dtype),
        lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]),
    )
    tiny_models.randomize_adapters(model)
    expected = {}
    for path, layer in lora_layers(model):
        A, B, scale = (t.to(torch.float32) if torch.is_tensor(t) else t for t in _factors(layer))
        delta = (B @ A) * scale
        delta = delta.T if path.endswith("embed_tokens") else delta
        W0 = layer.base_layer.weight.detach()
        expected[f"{path}.weight"] = (W0.to(torch.float32) + delta).to(dtype)
    lorakit.merge(model)
    merged = _weights(model)
    for key, want in expected.items():
        assert merged[key].dtype == dtype
        assert torch.equal(merged[key], want), key


def test_float64_merged_lora_bias_is_the_float64_sum():
    """``lora_bias=True``: the merged bias is ``bias0 + s b`` in float64 (it was summed in
    float32, 1e-10 off, while the weight beside it was exact)."""
    base = _f64(tiny_models.gpt2())
    config = lorakit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True
    )
    model = lorakit.inject(copy.deepcopy(base), config)
    _randomize(model)
    expected = {}
    for _, layer in lora_layers(model):
        scale = layer.scalings["default"]
        expected[layer] = layer.base_layer.bias.detach() + scale * layer.lora_bias_of("default")
    lorakit.merge(model)
    for layer, bias in expected.items():
        assert layer.base_layer.bias.dtype == F64
        assert torch.equal(layer.base_layer.bias.detach(), bias.detach())
