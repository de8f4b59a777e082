"""DoRA's cached row norms (``lorakit.layers.dora.RowNorms``) follow every change of A, B, m and
W0 that a training loop or a conversion makes (review, session 29): a hand-written step through
``.data`` after a forward that followed the backward, and a round trip through bf16 that lands
W0's rounded values at its old address."""

from __future__ import annotations

import torch
from torch import nn

import lorakit
from lorakit.state import lora_layers


def _layer_model(size: int = 32):
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = lorakit.inject(nn.Sequential(nn.Linear(size, size)), config)
    return model, dict(lora_layers(model))["0"]


def _formula(layer, x: torch.Tensor) -> torch.Tensor:
    """``f * (W0 x + s B A x) + b`` with ``f = m / ||W0 + s B A||_row``, in float64."""
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    m, s = layer.lora_magnitude_vector["default"].weight.double(), layer.scalings["default"]
    f = m / (W + s * B @ A).norm(dim=1)
    return f * (x.double() @ W.T + s * (x.double() @ A.T @ B.T)) + b


def test_a_data_step_after_a_forward_that_followed_the_backward_is_seen():
    model, layer = _layer_model()
    x = torch.randn(8, 32)
    model(x).pow(2).sum().backward()
    with torch.no_grad():
        model(x)  # a logging / evaluation forward between backward and step
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(p.grad, alpha=-0.5)  # a hand-written step: no counter moves
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.double(), _formula(layer, x), rtol=0, atol=1e-4)


def test_fused_adamw_steps_are_seen():
    model, layer = _layer_model()
    x = torch.randn(8, 32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        with torch.no_grad():
            model(x)
        optimizer.step()
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out.double(), _formula(layer, x), rtol=0, atol=1e-4)


def test_a_conversion_forgets_the_cached_norms():
    """``model.to(bf16).to(float32)`` leaves W0 rounded, often at its old address and version;
    the values must be those of the rounded W0 whatever the allocator did."""
    model, layer = _layer_model(64)
    model.requires_grad_(False)
    x = torch.randn(4, 64)
    for _ in range(5):
        with torch.no_grad():
            model(x)
        assert layer.row_norms._base is not None
        model.to(torch.bfloat16)
        assert layer.row_norms._base is None and not layer.row_norms._norms
        model.to(torch.float32)
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out.double(), _formula(layer, x), rtol=0, atol=1e-5)
