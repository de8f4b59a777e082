"""DoRA's cached row norms follow hand-written steps through ``.data`` that leave no gradient,
DoRA traces under ``torch.compile(fullgraph=True)``, and the bias on B keeps float64.

Reference: DoRA's formula in float64, ``y = W0 x + b + (f - 1) W0 x + f s B A x`` with
``f = m / ||W0 + s B A||_row``, and the real peft for ``lora_bias``.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch._dynamo
from torch import nn

import lorakit


def dora_layer(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12)).to(dtype)
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["0"], init_lora_weights=False
    )
    return lorakit.inject(model, config)


def dora_formula(layer, x):
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    lora_A, lora_B, magnitude = (p.detach() for p in layer.adapter_parameters("default"))
    scale = layer.scalings["default"]
    factor = magnitude / (weight + scale * lora_B @ lora_A).norm(dim=1)
    base = x @ weight.T
    return (base + bias + (factor - 1) * base + factor * scale * (x @ lora_A.T @ lora_B.T)).detach()


def test_a_hand_written_step_through_data_without_gradients_is_seen():
    model = dora_layer().train()
    layer = model[0]
    x = torch.randn(5, 16, dtype=torch.float64)
    parameters = [p for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        out = model(x)
        torch.testing.assert_close(out.detach(), dora_formula(layer, x), rtol=0, atol=1e-12)
        out.pow(2).sum().backward()
        for parameter in parameters:  # SGD through .data, then no gradient left
            parameter.data.sub_(0.05 * parameter.grad)
            parameter.grad = None


def test_a_data_write_in_eval_is_seen_and_unchanged_adapters_reuse_the_norms():
    model = dora_layer().eval()
    layer = model[0]
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)  # unchanged: the same (cached) values
        layer.lora_B["default"].weight.data.mul_(3.0)
        torch.testing.assert_close(model(x), dora_formula(layer, x), rtol=0, atol=1e-12)
        assert (model(x) - first).abs().max() > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_dora_has_no_graph_break_and_compiles_fullgraph(training):
    model = dora_layer(torch.float32).train(training)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model[0])(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    params = [x, *model[0].adapter_parameters("default")]
    got, want = compiled(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, params, grad),
        torch.autograd.grad(want, params, grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lora_bias_in_a_float64_model_equals_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 5)).double()
    kwargs = dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["0", "2"])
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    )
    ours = lorakit.inject(base, lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
                ours.get_parameter(name.removeprefix("base_model.model.")).copy_(parameter)
    x = torch.randn(7, 16, dtype=torch.float64)
    results = []
    for model in (theirs, ours):
        out = model(x)
        out.pow(2).sum().backward()
        grads = {
            name.removeprefix("base_model.model."): p.grad
            for name, p in model.named_parameters()
            if p.grad is not None
        }
        results.append((out.detach(), grads))
    (out_peft, grads_peft), (out_ours, grads_ours) = results
    torch.testing.assert_close(out_ours, out_peft, rtol=0, atol=1e-12)
    assert grads_ours.keys() == grads_peft.keys() and any("lora_B" in k for k in grads_ours)
    for name, grad in grads_peft.items():
        torch.testing.assert_close(grads_ours[name], grad, rtol=0, atol=1e-12, msg=name)
