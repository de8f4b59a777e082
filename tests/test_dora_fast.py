"""DoRA on the fused path (``lorakit.fast.dora``) against float64 gradcheck, the DoRA formula in
float64 with the same dropout mask, and the plain path (mixed LoRA/DoRA inference too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import fast
from lorakit.fast.dropout import DROPOUT_LEVELS, drop_levels, keep_mask, new_seed


def _layer(dtype=torch.float32, dropout=0.0, fan_in_fan_out=False, adapters=("default",)):
    """A DoRA layer (12 -> 10, bias, r=3) with random A, B and magnitude (f far from 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).to(dtype)
    for index, name in enumerate(adapters):
        config = lorakit.LoraConfig(
            r=3,
            lora_alpha=6.0,
            target_modules=["0"],
            lora_dropout=dropout,
            init_lora_weights=False,
            use_dora=name != "plain",
        )
        lorakit.inject(model, config, adapter_name=name, activate=index == 0)
    layer = model[0]
    with torch.no_grad():
        for name in adapters:
            for parameter in layer.adapter_parameters(name):
                parameter.mul_(1 + 0.5 * torch.rand(parameter.shape, dtype=dtype))
    return layer.train()


def _reference(layer, x, name="default", mask=None, p=0.0):
    """``W0 x + b + (f - 1) W0 x~ + f s B A x~`` in float64, n computed directly."""
    weight, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = (t.double() for t in layer.adapter_parameters(name)[:2])
    m = layer.lora_magnitude_vector[name].weight.double()
    s = layer.scalings[name]
    norms = torch.linalg.vector_norm(weight + s * B @ A, dim=1).detach()
    f = m / norms
    x = x.double()
    kept = x if mask is None else x * mask / (1 - p)
    return x @ weight.T + bias + (f - 1) * (kept @ weight.T) + f * (((kept @ A.T) * s) @ B.T)


@pytest.mark.parametrize("drop", [0, 3277])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gradcheck_float64(drop: int, fan_in_fan_out: bool) -> None:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)

    weight = rand(5, 4, grad=False) if fan_in_fan_out else rand(4, 5, grad=False)
    norms = rand(4, grad=False).abs() + 0.5
    inputs = (
        rand(2, 3, 5),
        weight,
        rand(4),
        rand(2, 5),
        rand(4, 2),
        rand(4),
        norms,
        1.7,
        drop,
        1234,
        fan_in_fan_out,
    )
    assert torch.autograd.gradcheck(fast.FusedDoraLinear.apply, inputs)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_float64_formula_with_the_same_mask(dropout: float) -> None:
    layer = _layer(torch.float64, dropout=dropout)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(4, 7, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "FusedDoraLinearBackward"
    torch.manual_seed(11)
    levels = drop_levels(dropout)
    mask = keep_mask((28, 12), levels, new_seed(), x.device).view(4, 7, 12) if levels else None
    x_ref = x.detach().clone().requires_grad_()
    ref = _reference(layer, x_ref, mask=mask, p=levels / DROPOUT_LEVELS)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = (*layer.adapter_parameters("default"), layer.base_layer.bias)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *params), grad)
    want = torch.autograd.grad(ref, (x_ref, *params), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_fused_equals_plain_path_in_fp32(grad_enabled: bool) -> None:
    layer = _layer(torch.float32)
    x = torch.randn(3, 5, 12)
    with torch.set_grad_enabled(grad_enabled):
        fused = layer(x)
        with fast.plain_path():
            plain = layer(x)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    assert (fused - layer.base_layer(x)).abs().max() > 0.1


def test_mixed_lora_and_dora_inference_is_fused_and_equals_the_formula(monkeypatch) -> None:
    layer = _layer(torch.float64, adapters=("one", "plain", "two")).eval()
    layer.active_adapters = ("one", "plain", "two")
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    calls = []
    inference = fast.dora_linear_inference
    monkeypatch.setattr(fast, "dora_linear_inference", lambda *a: calls.append(1) or inference(*a))
    with torch.no_grad():
        fused = layer(x)
        assert calls == [1]
        with fast.plain_path():
            plain = layer(x)
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    A, B = layer.adapter_parameters("plain")
    lora_only = (x @ A.T * layer.scalings["plain"]) @ B.T
    expected = _reference(layer, x, "one") + _reference(layer, x, "two") - base + lora_only
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)
    layer.merge(("one", "plain", "two"))  # merges sum in float32 (as for LoRA)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_bf16_training_with_fp32_adapters_takes_the_plain_path() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).to(torch.bfloat16)
    config = lorakit.LoraConfig(r=3, target_modules=["0"], use_dora=True, init_lora_weights=False)
    layer = lorakit.inject(model, config)[0].train()
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert type(out.grad_fn).__name__ != "FusedDoraLinearBackward"
    with torch.no_grad():
        fused = layer(x)
    reference = _reference(layer, x)
    torch.testing.assert_close(fused.double(), reference, rtol=0.02, atol=0.02)
    torch.testing.assert_close(out.double(), reference, rtol=0.02, atol=0.02)


def test_cached_inference_scales_follow_in_place_updates() -> None:
    layer = _layer(torch.float64).eval()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)  # served from the cache
        for parameter in layer.adapter_parameters("default"):  # as an optimiser step would
            parameter.mul_(1.5)
            after = layer(x)
            torch.testing.assert_close(after, _reference(layer, x), rtol=1e-12, atol=1e-12)
            assert (after - before).abs().max() > 1e-3
            before = after


def test_the_dropout_mask_is_saved_where_saved_tensor_hooks_see_it() -> None:
    """The mask's bits (N k / 8 bytes) were kept on ``ctx``, out of sight of
    ``saved_tensors_hooks`` (save_on_cpu, offloading, byte counts) and of the version check;
    the LoRA node saves its mask through ``save_for_backward``, and so does DoRA's now."""
    torch.manual_seed(0)
    layer = _layer(dropout=0.3)
    x = torch.randn(64, 12, requires_grad=True)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        out = layer(x)
    assert type(out.grad_fn).__name__ == "FusedDoraLinearBackward"
    masks = [t for t in seen if t.dtype == torch.uint8]
    assert [t.numel() for t in masks] == [64 * 12 // 8]
    out.sum().backward()  # (the backward reads the mask from the saved tensors)
    assert x.grad is not None and torch.isfinite(x.grad).all()
