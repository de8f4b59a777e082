"""find_targets: PEFT's matching rules, and the errors when nothing (or something odd) matches."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig, find_targets
from lorakit.errors import TargetModulesError
from tests import tiny_models


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"head": nn.Linear(4, 4), "floral_head": nn.Linear(4, 4)})
            for _ in range(3)
        )
        self.norm = nn.LayerNorm(4)


def test_list_entries_match_whole_name_parts_only() -> None:
    names = find_targets(Toy(), LoraConfig(target_modules=["head"]))
    assert names == ["blocks.0.head", "blocks.1.head", "blocks.2.head"]


def test_string_is_a_full_match_regex() -> None:
    assert find_targets(Toy(), LoraConfig(target_modules=r"blocks\.1\..*head")) == [
        "blocks.1.head",
        "blocks.1.floral_head",
    ]
    assert find_targets(Toy(), LoraConfig(target_modules="head")) == []


def test_exclude_and_layer_selection() -> None:
    config = LoraConfig(target_modules=["head", "floral_head"], exclude_modules=["floral_head"])
    assert len(find_targets(Toy(), config)) == 3
    config = LoraConfig(
        target_modules=["head"], layers_to_transform=[0, 2], layers_pattern="blocks"
    )
    assert find_targets(Toy(), config) == ["blocks.0.head", "blocks.2.head"]
    config = LoraConfig(target_modules=["head"], layers_to_transform=1, layers_pattern="blocks")
    assert find_targets(Toy(), config) == ["blocks.1.head"]
    # Without layers_pattern the index is the first "<container>.<digits>." after a dot (PEFT's rule).
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=1)
    assert find_targets(tiny_models.llama(), config) == ["model.layers.1.self_attn.q_proj"]


def test_all_linear_skips_output_embedding_and_seq_cls_head() -> None:
    llama = find_targets(tiny_models.llama(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in llama and len(llama) == 2 * 7
    bert = tiny_models.bert()
    names = find_targets(bert, LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_nothing_matched_lists_request_and_closest_names() -> None:
    with pytest.raises(ValueError) as error:
        lorakit.inject(tiny_models.llama(), LoraConfig(target_modules=["q_prj", "value"]))
    message = str(error.value)
    assert "['q_prj', 'value']" in message
    closest = message.split("Closest module names: ")[1].split("]")[0]  # by difflib, not the list
    assert "'q_proj'" in closest and "'v_proj'" in closest and "'gate_proj'" not in closest


def test_unsupported_type_names_module_and_type() -> None:
    with pytest.raises(
        TargetModulesError, match=r"'norm' is a torch.nn.modules.normalization.LayerNorm"
    ):
        lorakit.inject(Toy(), LoraConfig(target_modules=["norm"]))


def test_a_refused_injection_leaves_the_model_as_it_was() -> None:
    """The unsupported module comes after supported ones: nothing may be wrapped or frozen."""
    model = tiny_models.llama()
    lorakit.inject(model, LoraConfig(target_modules=["v_proj"]), "first")
    modules = dict(model.named_modules())
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TargetModulesError, match="input_layernorm"):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]), "second")
    assert dict(model.named_modules()) == modules  # the very same module objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
    assert list(lorakit.adapter_configs(model)) == ["first"]
    fresh = tiny_models.llama()
    with pytest.raises(TargetModulesError):
        lorakit.inject(fresh, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert "lorakit_state" not in fresh.__dict__
    assert all(p.requires_grad for p in fresh.parameters())
    lorakit.inject(fresh, LoraConfig(target_modules=["q_proj"]))  # a corrected retry works
    assert len(list(lorakit.state.lora_layers(fresh))) == len(fresh.model.layers)


def test_targets_found_again_after_injection() -> None:
    model = tiny_models.llama()
    config = LoraConfig(target_modules=["q_proj"])
    before = find_targets(model, config)
    lorakit.inject(model, config)
    assert find_targets(model, config) == before
