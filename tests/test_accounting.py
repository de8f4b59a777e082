"""Every parameter count the seed article states, checked on real model structures.

Llama-2-7B is built from its config on the ``meta`` device (no memory). The seed prints
``all params: 6,778,957,824 || trainable%: 0.5897``; no Llama-2-7B configuration reproduces that
(it is 565,248 more than the real 6,738,415,616 + 39,976,960). peft 0.21.2 prints the true figure
``6,778,392,576`` (0.5898%), and so do we.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import functional
from tests import tiny_models

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama2_7b() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_llama2_7b_base_parameter_count() -> None:
    assert lorakit.count_parameters(_llama2_7b()).total == 6_738_415_616


def test_llama2_7b_seed_config_prints_peft_line(capsys) -> None:
    model = lorakit.inject(
        _llama2_7b(),
        lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, lora_dropout=0.05),
    )
    counts = lorakit.print_trainable_parameters(model)
    assert capsys.readouterr().out == (
        "trainable params: 39,976,960 || all params: 6,778,392,576 || trainable%: 0.5898\n"
    )
    assert counts.trainable == 39_976_960
    # The seed's "all params" is off by 565,248 (see module docstring).
    assert 6_778_957_824 - counts.total == 565_248


@pytest.mark.parametrize(
    ("targets", "per_block"),
    [
        (["q_proj", "v_proj"], 262_144),  # 2 x 16 x (4096 + 4096)
        (["q_proj", "k_proj", "v_proj", "o_proj"], 524_288),  # 4 x 16 x (4096 + 4096)
        (SEVEN, 1_249_280),  # 524,288 + 3 x 16 x (4096 + 11008)
    ],
)
def test_seed_per_block_counts(targets: list[str], per_block: int) -> None:
    model = lorakit.inject(_llama2_7b(), lorakit.LoraConfig(r=16, target_modules=targets))
    assert lorakit.count_parameters(model).trainable == 32 * per_block


def test_seed_mlp_share_per_block() -> None:
    mlp = lorakit.inject(
        _llama2_7b(), lorakit.LoraConfig(r=16, target_modules=["gate_proj", "up_proj", "down_proj"])
    )
    assert lorakit.count_parameters(mlp).trainable == 32 * 724_992
    assert 3 * functional.lora_parameter_count(11008, 4096, 16) == 724_992


def test_all_linear_equals_the_seven_projections_on_llama() -> None:
    model = lorakit.inject(_llama2_7b(), lorakit.LoraConfig(r=16, target_modules="all-linear"))
    assert lorakit.count_parameters(model).trainable == 39_976_960


def test_seed_lora_linear_example_counts() -> None:
    base = nn.Linear(256, 512, bias=False)
    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    lorakit.inject(wrapper, lorakit.LoraConfig(r=8, lora_alpha=8, target_modules=["proj"]))
    counts = lorakit.count_parameters(wrapper)
    assert counts.trainable == 6_144
    assert counts.total - counts.trainable == 131_072
    assert round((counts.total - counts.trainable) / counts.trainable, 1) == 21.3


@pytest.mark.parametrize(
    "name", ["bnb-nf4-dq", "bnb-int8", "gguf-Q4_1", "torchao-int8-weight-only"]
)
def test_a_quantized_base_counts_the_numbers_its_weights_stand_for(name) -> None:
    """As PEFT counts them: a bitsandbytes 4-bit Params4bit holds two values a byte, and a
    weight held in buffers (GGUF blocks) still counts (the total read 28.8M for SmolLM2)."""
    from tests.quantized_layers import quantize_linears

    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    float_counts = lorakit.count_parameters(lorakit.inject(tiny_models.llama(), config))
    quantized = quantize_linears(tiny_models.llama(), name)
    counts = lorakit.count_parameters(lorakit.inject(quantized, config))
    assert (counts.trainable, counts.total) == (float_counts.trainable, float_counts.total)


def test_replicated_layers_of_a_quantized_base_share_their_weights_and_count_once() -> None:
    """layer_replication shares the copies' base weights; a GGUF base holds them in buffers,
    which were copied (memory and the count doubled)."""
    from tests.quantized_layers import quantize_linears

    config = lorakit.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [0, 2]]
    )
    float_counts = lorakit.count_parameters(lorakit.inject(tiny_models.llama(), config))
    model = lorakit.inject(quantize_linears(tiny_models.llama(), "gguf-Q4_1"), config)
    assert lorakit.count_parameters(model) == float_counts
    first, copy = (model.get_submodule(f"model.layers.{i}.self_attn.k_proj") for i in (0, 2))
    assert first is not copy and first.packed is copy.packed
