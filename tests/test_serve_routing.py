"""A model's own adapter served from a one-slot bank (``lorakit.serve.routing.own_adapter_bank``,
what ``lorakit generate`` does): taken only where the bank adds exactly what the model's layers
would, and then the same greedy tokens as transformers' ``generate`` on the model itself."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.commands.generate import engine_greedy
from lorakit.serve.routing import own_adapter_bank
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [5, 9, 2, 7, 7, 1]


def adapted(**fields) -> torch.nn.Module:
    model = tiny_models.llama()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear") | fields
    lorakit.inject(model, lorakit.LoraConfig(**config))
    tiny_models.randomize_adapters(model, std=0.3)
    model.generation_config.eos_token_id = None
    return model


def own_generate(model) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"use_dora": True},
        {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 2}},
    ],
    ids=["lora", "dora", "qv-rank-pattern"],
)
def test_the_bank_takes_the_adapter_and_greedy_tokens_are_the_models_own(fields):
    model = adapted(**fields)
    bank, name = own_adapter_bank(model)
    assert name == "default" and bank.slot_of("default") == 0
    without = tiny_models.llama()
    assert engine_greedy(model, PROMPT, 8) == own_generate(model) != own_generate(without)


def test_other_adapters_keep_the_models_own_layers():
    two = adapted()
    lorakit.inject(two, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="other")
    with lorakit.use_adapters(two, ["default", "other"]):
        assert own_adapter_bank(two) is None  # two adapters at once
    merged = adapted()
    lorakit.merge(merged)
    assert own_adapter_bank(merged) is None  # already in the weights
    assert own_adapter_bank(adapted(lora_bias=True)) is None  # a bias the bank does not hold
    assert own_adapter_bank(adapted(modules_to_save=["lm_head"])) is None
    embeddings = adapted(target_modules=["q_proj", "embed_tokens"])
    assert own_adapter_bank(embeddings) is None  # an embedding layer is not routed
    assert own_adapter_bank(tiny_models.llama()) is None  # no adapter at all
    for model in (two, merged, embeddings):  # and generation still follows the model
        assert engine_greedy(model, PROMPT, 8) == own_generate(model)
