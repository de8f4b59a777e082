"""A ``layers_pattern`` that names no layer container of the model: the error names it (and the
containers that exist) instead of blaming ``layers_to_transform`` for removing the very layers
it asked for (GPT-2's layers are ``transformer.h.<i>``: ``layers_pattern="layers"`` finds none)."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig, find_targets
from lorakit.target_errors import _layer_containers, no_match_message
from tests import tiny_models


def _inject_error(model: nn.Module, **fields) -> str:
    with pytest.raises(ValueError) as error:
        lorakit.inject(model, LoraConfig(**fields))
    return str(error.value)


def test_gpt2_layers_pattern_layers_names_h_and_the_way_out() -> None:
    message = _inject_error(
        tiny_models.gpt2(),
        target_modules=["c_attn"],
        layers_to_transform=[0],
        layers_pattern="layers",
    )
    assert message == (
        "target_modules=['c_attn'] matched modules, but layers_pattern='layers' names no layer "
        "container of this GPT2LMHeadModel (no matched module has 'layers.<number>.' in its "
        "path), so layers_to_transform=[0] found no layer index and removed "
        "['transformer.h.0.attn.c_attn', 'transformer.h.1.attn.c_attn']; the layer containers "
        "in the matched modules' paths are ['h']: set layers_pattern to one of them (e.g. "
        "layers_pattern='h') or drop it; nothing is left to adapt."
    )
    assert "layers_to_transform=[0] removed" not in message


def test_llama_layers_pattern_blocks_names_layers() -> None:
    message = _inject_error(
        tiny_models.llama(),
        target_modules=["q_proj"],
        layers_to_transform=[0],
        layers_pattern="blocks",
    )
    assert "layers_pattern='blocks' names no layer container of this LlamaForCausalLM" in message
    assert "'blocks.<number>.'" in message
    assert "the layer containers in the matched modules' paths are ['layers']" in message
    assert "(e.g. layers_pattern='layers') or drop it" in message


def test_the_suggested_pattern_and_dropping_it_select_layer_zero() -> None:
    for pattern in ("h", None):
        config = LoraConfig(
            target_modules=["c_attn"], layers_to_transform=[0], layers_pattern=pattern
        )
        assert find_targets(tiny_models.gpt2(), config) == ["transformer.h.0.attn.c_attn"]


def test_list_layers_pattern_that_finds_nothing() -> None:
    message = _inject_error(
        tiny_models.llama(),
        target_modules=["q_proj"],
        layers_to_transform=[1],
        layers_pattern=["blocks", "h"],
    )
    assert "layers_pattern=['blocks', 'h'] names no layer container" in message
    assert "'blocks|h.<number>.'" in message and "['layers']" in message


def test_a_pattern_that_finds_the_layers_keeps_blaming_the_layer_indices() -> None:
    message = _inject_error(
        tiny_models.llama(),
        target_modules=["q_proj"],
        layers_to_transform=[5],
        layers_pattern="layers",
    )
    assert "names no layer container" not in message
    assert (
        "layers_to_transform=[5] removed ['model.layers.0.self_attn.q_proj', "
        "'model.layers.1.self_attn.q_proj']" in message
    )


class TopLevel(nn.Module):
    """Layers at the top of the path (``blocks.<i>.head``): only a layers_pattern finds them
    (PEFT's rule without one wants a container after a dot), so dropping it is no way out."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"head": nn.Linear(4, 4)}) for _ in range(2))
        self.others = nn.ModuleList(nn.ModuleDict({"tail": nn.Linear(4, 4)}) for _ in range(2))


def test_top_level_container_is_listed_without_drop_it() -> None:
    config = LoraConfig(target_modules=["head"], layers_to_transform=[0], layers_pattern="layer")
    message = no_match_message(TopLevel(), config)
    assert "layers_pattern='layer' names no layer container of this TopLevel" in message
    assert message.endswith(
        "are ['blocks']: set layers_pattern to one of them (e.g. layers_pattern='blocks'); "
        "nothing is left to adapt."
    )


def test_pattern_naming_another_container_says_of_the_matched_modules() -> None:
    config = LoraConfig(target_modules=["tail"], layers_to_transform=[0], layers_pattern="blocks")
    message = no_match_message(TopLevel(), config)
    assert "layers_pattern='blocks' names no layer container of the matched modules" in message
    assert "are ['others']" in message


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.ModuleDict({"proj": nn.Linear(4, 4)})


def test_paths_without_a_layer_number_say_drop_both() -> None:
    config = LoraConfig(target_modules=["proj"], layers_to_transform=[0], layers_pattern="layers")
    message = no_match_message(Flat(), config)
    assert (
        "removed ['inner.proj'] (the matched modules' paths hold no layer number: drop " in message
    )
    assert "layers_to_transform and layers_pattern to adapt them)" in message


def test_layer_containers_outermost_first_each_once() -> None:
    names = [
        "model.layers.0.mlp.experts.1.w1",
        "model.layers.1.mlp.experts.0.w1",
        "transformer.h.0.attn.c_attn",
        "blocks.3",
    ]
    assert _layer_containers(names) == ["layers", "experts", "h"]
