"""The LoRA maths against plain float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit import functional


def test_scaling_plain_and_rslora() -> None:
    assert functional.scaling(16, 32) == 2.0
    assert functional.scaling(16, 32, use_rslora=True) == 8.0
    assert functional.scaling(8, 8) == 1.0
    with pytest.raises(ValueError, match="r=0"):
        functional.scaling(0, 8)


def test_parameter_count_and_compression_match_the_seed() -> None:
    # The seed's 4096 x 4096 projection at r = 16: 16,777,216 full vs 131,072 LoRA, 128x,
    # counted on a real (meta-device, no memory) layer injected by lorakit.
    with torch.device("meta"):
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(4096, 4096, bias=False))
    lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]))
    counts = lorakit.count_parameters(model)
    assert counts.total - counts.trainable == 16_777_216 and counts.trainable == 131_072
    assert (counts.total - counts.trainable) / counts.trainable == 128.0
    assert functional.lora_parameter_count(4096, 4096, 16) == 131_072
    assert functional.compression_ratio(4096, 4096, 16) == 128.0
    # The seed's quiz: 4096 x 4096 at r = 8.
    assert functional.lora_parameter_count(4096, 4096, 8) == 65_536
    # The seed's LoRALinear example: d=512, k=256, r=8 -> 6,144 trainable.
    assert functional.lora_parameter_count(512, 256, 8) == 6_144


def test_lora_forward_equals_float64_formula() -> None:
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    lora_A = torch.randn(4, 24, dtype=torch.float64)
    lora_B = torch.randn(16, 4, dtype=torch.float64)
    expected = 0.5 * x @ (lora_B @ lora_A).T
    actual = functional.lora_forward(x, lora_A, lora_B, 0.5)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_add_lora_forward_adds_the_float64_formula_in_place() -> None:
    x = torch.randn(7, 24, dtype=torch.float64)
    lora_A = torch.randn(4, 24, dtype=torch.float64)
    lora_B_t = torch.randn(4, 16, dtype=torch.float64)  # B^T
    out = torch.randn(7, 16, dtype=torch.float64)
    expected = out + 0.5 * x @ (lora_B_t.T @ lora_A).T
    returned = functional.add_lora_forward_(out, x, lora_A, lora_B_t, 0.5)
    assert returned is out
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_delta_weight_layouts() -> None:
    lora_A, lora_B = torch.randn(2, 6), torch.randn(5, 2)
    expected = 3.0 * lora_B.double() @ lora_A.double()
    torch.testing.assert_close(functional.delta_weight(lora_A, lora_B, 3.0).double(), expected)
    transposed = functional.delta_weight(lora_A, lora_B, 3.0, fan_in_fan_out=True)
    torch.testing.assert_close(transposed.double(), expected.T)


def test_delta_weight_is_float32_for_half_storage() -> None:
    lora_A = torch.randn(2, 6).bfloat16()
    lora_B = torch.randn(5, 2).bfloat16()
    delta = functional.delta_weight(lora_A, lora_B, 1.0)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, lora_B.float() @ lora_A.float())


def test_embedding_forward_equals_lookup_of_the_delta_table() -> None:
    lora_A = torch.randn(3, 10, dtype=torch.float64)  # (r, num_embeddings)
    lora_B = torch.randn(7, 3, dtype=torch.float64)  # (dim, r)
    ids = torch.tensor([[0, 4, 9], [2, 2, 1]])
    table = functional.embedding_delta_weight(lora_A, lora_B, 2.0, dtype=torch.float64)
    assert table.shape == (10, 7)
    actual = functional.lora_embedding_forward(ids, lora_A, lora_B, 2.0)
    torch.testing.assert_close(actual, table[ids], rtol=1e-12, atol=1e-12)
    assert math.isclose(table[4, 2].item(), 2.0 * float(lora_B[2] @ lora_A[:, 4]), rel_tol=1e-12)
