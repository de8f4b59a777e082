"""Quantized layers no backend knows are refused, never treated as a plain ``nn.Linear``; and
``quantized.merge.requantize`` refuses a weight of another shape than the layer's.

A layer that quantizes in its forward (transformers' BitNet ``AutoBitLinear``: a float weight,
quantized with the activations on every call) or stores its weights under other names
(compressed-tensors' ``CompressedLinear``: ``weight`` deleted, packed integer parameters) would
give a merge that is silently wrong (``W0 + s B A`` is not what its forward computes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.bitnet import AutoBitLinear

import lorakit
from lorakit import quantized
from lorakit.quantized import UnsupportedQuantizedLayerError, int8_rows
from lorakit.quantized import merge as quantized_merge

CONFIG = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])


class Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def packed_linear(module_path: str, class_name: str) -> nn.Linear:
    """An ``nn.Linear`` subclass of another library (``module_path``) with its ``weight``
    deleted and int32 codes plus float scales in its place, as compressed-tensors stores one."""
    kind = type(
        class_name,
        (nn.Linear,),
        {
            "__module__": module_path,
            "forward": lambda self, x: nn.functional.linear(
                x, self.weight_packed.float() * self.weight_scale, self.bias
            ),
        },
    )
    layer = nn.Linear(16, 12)
    layer.__class__ = kind
    del layer.weight
    codes = torch.randint(-8, 8, (12, 16), dtype=torch.int32)
    layer.weight_packed = nn.Parameter(codes, requires_grad=False)
    layer.weight_scale = nn.Parameter(torch.rand(12, 1), requires_grad=False)
    return layer


def refused_unchanged(model: Holder, match: str) -> None:
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    kind = type(model.proj)
    with pytest.raises(UnsupportedQuantizedLayerError, match=match):
        lorakit.inject(model, CONFIG)
    assert type(model.proj) is kind
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("online_quant", [True, False])
def test_bitnet_autobitlinear_is_refused_by_its_class(online_quant):
    layer = AutoBitLinear(16, 12, bias=False, online_quant=online_quant)
    refused_unchanged(Holder(layer), r"'proj'.*transformers\.integrations\.bitnet\.AutoBitLinear")


def test_a_linear_with_packed_integer_parameters_is_refused():
    layer = packed_linear("compressed_tensors.linear.compressed_linear", "CompressedLinear")
    refused_unchanged(Holder(layer), r"'proj'.*CompressedLinear")


def test_a_linear_without_a_weight_is_refused_whatever_its_name():
    layer = packed_linear("otherlib.layers", "PackedLinear")  # no quantized-sounding name
    refused_unchanged(Holder(layer), r"'proj'.*'weight_packed' is stored as torch\.int32")
    del layer.weight_packed  # float parameters only, and still no weight
    layer.weight_codes = nn.Parameter(torch.randn(12, 16), requires_grad=False)
    refused_unchanged(Holder(layer), r"'proj'.*an nn\.Linear without a weight tensor")


def test_plain_linears_and_integer_buffers_are_not_refused():
    plain = nn.Linear(16, 12)
    plain.register_buffer("position_ids", torch.arange(12))  # integer buffers are common
    model = lorakit.inject(Holder(plain), CONFIG)
    assert type(model.proj).__name__ == "LoraLinear"


def test_requantize_refuses_a_weight_of_another_shape():
    linear = nn.Linear(16, 12)
    layer = int8_rows.Int8RowsLinear.from_weight(linear.weight.detach(), linear.bias.detach())
    with pytest.raises(
        ValueError, match=r"weight is \(3, 5\) but the int8-rows.* base is \(12, 16\)"
    ):
        quantized_merge.requantize(layer, torch.randn(3, 5))
    report = quantized_merge.requantize(layer, quantized.dequantized_weight(layer))
    assert tuple(quantized.shape(report.module)) == (12, 16)
    assert report.relative_weight_error < 1e-2
