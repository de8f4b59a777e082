"""Quantized bases offloaded by accelerate (a regression review of round 35's offload fixes).

The round's forward sent every offloaded base through a staleness check that read
``base_layer.weight``: lorakit's own int8-rows / int4-groups layers have none (an
``AttributeError`` at the first forward, where the round before gave exactly the non-offloaded
output), and a bitsandbytes layer was told it "holds merged adapters []". A bitsandbytes layer
accelerate offloaded was wrong before too (0.6 off the non-offloaded model, silently; the plain
model itself raises there): refused now, before any change.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload

import lorakit
from lorakit.quantized import int4_groups, int8_rows
from tests import quantized_layers, tiny_models


def _config():
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _quantized(quantize_linears):
    model = tiny_models.llama(seed=0)
    quantize_linears(model)
    return model


@pytest.mark.parametrize(
    "quantize_linears", [int8_rows.quantize_linears, int4_groups.quantize_linears]
)
@pytest.mark.parametrize("order", ["offload then inject", "inject then offload"])
def test_an_offloaded_int8_rows_or_int4_groups_base_computes_as_not_offloaded(
    quantize_linears, order
):
    ids = tiny_models.input_ids()
    reference = lorakit.inject(_quantized(quantize_linears), _config())
    tiny_models.randomize_adapters(reference, seed=3)
    factors = {k: v.clone() for k, v in reference.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        expected = reference(ids).logits
    model = _quantized(quantize_linears)
    if order == "offload then inject":
        cpu_offload(model, execution_device=torch.device("cpu"))
        lorakit.inject(model, _config())
        model.load_state_dict(factors, strict=False)
    else:
        lorakit.inject(model, _config())
        model.load_state_dict(factors, strict=False)
        cpu_offload(model, execution_device=torch.device("cpu"))
    with torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, expected)


def test_an_offloaded_bitsandbytes_base_is_refused_before_any_change():
    model = tiny_models.llama(seed=0)
    for layer in model.model.layers:
        layer.self_attn.q_proj = quantized_layers.bnb_4bit(layer.self_attn.q_proj)
    cpu_offload(model, execution_device=torch.device("cpu"))
    before = dict(model.named_modules())
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj' is a bitsandbytes"
    ):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert dict(model.named_modules()) == before
    assert not lorakit.adapter_configs(model)
