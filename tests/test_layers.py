"""LoRA layers in isolation: initialisation, wrapping, and exact merge on random shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit.layers import LoraEmbedding, LoraLinear


def _wrapped(module: nn.Module, **config) -> nn.Module:
    holder = nn.Sequential()
    holder.add_module("target", module)
    lorakit.inject(holder, lorakit.LoraConfig(target_modules=["target"], **config))
    layer = holder.target
    layer.__dict__["holder"] = holder  # plain attribute: not registered as a submodule
    return layer


def test_default_init_is_kaiming_a_and_zero_b_so_output_equals_base() -> None:
    base = nn.Linear(256, 128)
    x = torch.randn(4, 256)
    expected = base(x)
    layer = _wrapped(base, r=8)
    lora_A = layer.lora_A["default"].weight
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert lora_A.abs().max() <= bound and lora_A.abs().max() > 0.9 * bound
    assert torch.equal(layer(x), expected)
    assert layer.base_layer is base


def test_gaussian_init_has_std_one_over_r() -> None:
    layer = _wrapped(nn.Linear(512, 64), r=4, init_lora_weights="gaussian")
    std = layer.lora_A["default"].weight.std().item()
    assert abs(std - 0.25) < 0.02
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_embedding_follows_peft_convention() -> None:
    layer = _wrapped(nn.Embedding(50, 16), r=4)
    assert isinstance(layer, LoraEmbedding)
    assert layer.lora_embedding_A["default"].shape == (4, 50)
    assert layer.lora_embedding_B["default"].shape == (16, 4)
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    assert torch.count_nonzero(layer.lora_embedding_B["default"]) > 0


def test_conv1d_is_detected_without_a_flag() -> None:
    from transformers.pytorch_utils import Conv1D

    layer = _wrapped(Conv1D(24, 8), r=2)  # nf=24 outputs, nx=8 inputs, weight (8, 24)
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert layer.lora_A["default"].weight.shape == (2, 8)
    assert layer.lora_B["default"].weight.shape == (24, 2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    out_features=st.integers(1, 24),
    in_features=st.integers(1, 24),
    rank=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    cycles=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_any_shape_merges_and_unmerges_exactly(
    out_features, in_features, rank, dtype, cycles, seed
) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features).to(dtype)
    original = base.weight.detach().clone()
    layer = _wrapped(base, r=rank, lora_alpha=2 * rank, init_lora_weights=False)
    holder = layer.holder
    x = torch.randn(3, in_features).to(dtype)
    with torch.no_grad():
        unmerged = layer(x).float()
        for _ in range(cycles):
            lorakit.merge(holder)
            assert layer.merged_adapters == ("default",)
            assert not torch.equal(layer.base_layer.weight, original)
            merged = layer(x).float()
            lorakit.unmerge(holder)
    assert torch.equal(layer.base_layer.weight, original)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    assert (merged - unmerged).abs().max() <= tolerance * max(1.0, unmerged.abs().max().item())


def test_given_factors_are_taken_over_without_a_copy_and_checked() -> None:
    """``add_adapter(values=(A, B))`` (how a file is loaded): the tensors become the adapter's
    parameters as they are when dtype and device fit, converted otherwise, refused if the shapes
    do not fit the rank."""
    layer = LoraLinear(nn.Linear(6, 5))
    lora_A, lora_B = torch.randn(3, 6), torch.randn(5, 3)
    layer.add_adapter(
        "a", 3, 6.0, 0.0, False, init=True, dtype=torch.float32, values=(lora_A, lora_B)
    )
    assert layer.lora_A["a"].weight.data_ptr() == lora_A.data_ptr()
    assert torch.equal(layer.lora_B["a"].weight, lora_B)  # init=True did not zero it
    layer.active_adapters = ("a",)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ (lora_B @ lora_A).T)
    layer.add_adapter(
        "b",
        3,
        6.0,
        0.0,
        False,
        init=None,
        dtype=torch.float32,
        values=(lora_A.double(), lora_B.bfloat16()),
    )
    assert layer.lora_B["b"].weight.dtype == torch.float32
    assert torch.equal(layer.lora_B["b"].weight, lora_B.bfloat16().float())
    with pytest.raises(ValueError, match=r"rank 2 needs \(\(2, 6\), \(5, 2\)\)"):
        layer.add_adapter("c", 2, 4.0, 0.0, False, None, torch.float32, values=(lora_A, lora_B))
    assert "c" not in layer.ranks


def test_a_hook_on_the_base_layer_keeps_the_base_output_under_no_grad() -> None:
    """Without autograd the branch is added in place, but never into a tensor the base module
    returned itself: a forward hook (activation capture) may hold it."""
    base = nn.Linear(12, 6)
    layer = _wrapped(base, r=2)
    nn.init.normal_(layer.lora_B["default"].weight)
    captured = []
    base.register_forward_hook(lambda module, inputs, output: captured.append(output))
    x = torch.randn(3, 12)
    expected_base = x @ base.weight.T + base.bias
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(captured[0], expected_base, rtol=0, atol=1e-6)
    assert (out - expected_base).abs().max() > 1e-2  # the branch is in the layer's output
