"""The base fingerprint of a quantized base: its packed codes and its format name, so an adapter
trained on one quantization of a model is told apart from another quantization and from the
float model."""

from __future__ import annotations

import pytest
import torch

from lorakit.io import fingerprint
from tests import quantized_layers


def _identity(layer):
    tensor, dtype_name = fingerprint.base_identity(layer)
    return fingerprint.weight_fingerprint(tensor, dtype_name), tensor, dtype_name


@pytest.mark.parametrize("name", sorted(quantized_layers.QUANTIZERS))
def test_a_quantized_base_is_identified_by_its_codes_and_format(name):
    layer = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear())
    stored, tensor, dtype_name = _identity(layer)
    assert stored["dtype"] == dtype_name == name
    assert fingerprint.describe_difference(stored, tensor, dtype_name) is None
    other = quantized_layers.QUANTIZERS[name](quantized_layers.float_linear(seed=1))
    _, other_tensor, other_name = _identity(other)
    assert fingerprint.describe_difference(stored, other_tensor, other_name) == (
        "sampled weights differ"
    )


@pytest.mark.parametrize(
    ("trained_on", "loaded_on"),
    [("bnb-nf4-dq", "bnb-fp4-dq"), ("bnb-nf4-dq", "bnb-nf4"), ("gguf-Q4_1", "gguf-Q4_0")],
)
def test_another_quantization_of_the_same_weights_is_named(trained_on, loaded_on):
    linear = quantized_layers.float_linear()
    stored, _, _ = _identity(quantized_layers.QUANTIZERS[trained_on](linear))
    _, tensor, dtype_name = _identity(quantized_layers.QUANTIZERS[loaded_on](linear))
    reason = fingerprint.describe_difference(stored, tensor, dtype_name)
    assert reason == (
        f"the adapter was trained on a {trained_on} base, this base is {loaded_on}; "
        "a different quantization computes different outputs"
    )


def test_the_float_model_and_its_quantization_are_told_apart_both_ways():
    linear = quantized_layers.float_linear()
    quantized_stored, codes, format_name = _identity(quantized_layers.bnb_4bit(linear))
    float_stored, weight, dtype_name = _identity(linear)
    assert dtype_name == "float32"
    assert "trained on a bnb-nf4-dq base, this base is float32" in (
        fingerprint.describe_difference(quantized_stored, weight, dtype_name)
    )
    assert "trained on a float32 base, this base is bnb-nf4-dq" in (
        fingerprint.describe_difference(float_stored, codes, format_name)
    )
    assert fingerprint.describe_difference(float_stored, linear.weight.to(torch.bfloat16)) is None
