"""LoraConfig: PEFT's fields, validated at construction with messages naming field and value."""

from __future__ import annotations

import pytest

from lorakit import LoraConfig, TaskType


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "LoraConfig.r=0"),
        ({"r": -4}, "LoraConfig.r=-4"),
        ({"r": 2.5}, "LoraConfig.r=2.5"),
        ({"lora_alpha": float("nan")}, "LoraConfig.lora_alpha=nan"),
        ({"lora_dropout": 1.0}, "LoraConfig.lora_dropout=1.0"),
        ({"lora_dropout": -0.1}, "LoraConfig.lora_dropout=-0.1"),
        ({"bias": "some"}, "LoraConfig.bias='some'"),
        ({"init_lora_weights": "Orthogonal"}, "init_lora_weights='Orthogonal'"),
        ({"target_modules": "(unclosed"}, "not a valid regular expression"),
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']=0"),
        ({"alpha_pattern": {"q_proj": float("-inf")}}, "alpha_pattern['q_proj']=-inf"),
        ({"layers_pattern": "layers"}, "layers_to_transform is None"),
        (
            {"target_modules": ".*q_proj", "layers_to_transform": [0]},
            "cannot be combined with a regex",
        ),
        ({"target_modules": ["q_proj"], "layers_to_transform": [-1]}, "layers_to_transform"),
        ({"lora_alpha": float("inf")}, "LoraConfig.lora_alpha=inf"),
        ({"lora_alpha": True}, "LoraConfig.lora_alpha=True"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj']=nan"),
        ({"use_rslora": "no"}, "LoraConfig.use_rslora='no'"),
        ({"fan_in_fan_out": "yes"}, "LoraConfig.fan_in_fan_out='yes'"),
        ({"task_type": "FOO"}, "LoraConfig.task_type='FOO'"),
        ({"modules_to_save": "classifier"}, 'not "classifier"'),
        ({"modules_to_save": ["classifier", 3]}, "LoraConfig.modules_to_save"),
        ({"rank_pattern": ["q_proj"]}, "LoraConfig.rank_pattern"),
        ({"base_model_name_or_path": 7}, "LoraConfig.base_model_name_or_path=7"),
    ],
)
def test_invalid_values_raise_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        LoraConfig(**fields)


def test_seed_config_is_accepted() -> None:
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        lora_dropout=0.05,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    assert config.task_type == "CAUSAL_LM"
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 16


def test_rank_and_alpha_patterns_first_match_wins() -> None:
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"q_proj": 2, r"layers\.1\..*": 4},
        alpha_pattern={"v_proj": 3},
    )
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2  # first key wins
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8  # not a ".q_proj" suffix
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16


def test_sets_are_stored_sorted() -> None:
    config = LoraConfig(target_modules={"v_proj", "q_proj"})
    assert config.target_modules == ["q_proj", "v_proj"]


def test_eva_and_loftq_settings_given_as_dicts_with_an_unknown_key_name_the_field():
    with pytest.raises(ValueError, match=r"LoraConfig\.eva_config=\{'bogus': 1\} is invalid.*rho"):
        LoraConfig(eva_config={"bogus": 1})
    with pytest.raises(ValueError, match=r"LoraConfig\.loftq_config=.*fields of .*loftq_bits"):
        LoraConfig(loftq_config={"bits": 4})
    assert LoraConfig(loftq_config={"loftq_bits": 8}).loftq_config.loftq_bits == 8
    assert LoraConfig(loftq_config={}).loftq_config is None
