"""Regexes from adapter configs: the ones that could backtrack without bound are refused before
any matching, naming the field and the pattern; the patterns PEFT users write are accepted and
keep their meaning."""

from __future__ import annotations

import re

import pytest
import torch

from lorakit import LoraConfig
from lorakit.patterns import MAX_PATTERN_CHARS, check_pattern

NESTED = "nested quantifiers"
TOO_MANY = "too many open-ended repeats"

# What Unsloth's FastVisionModel.get_peft_model saves as target_modules (language tower only),
# as found in adapter_config.json files of vision-language fine-tunes (Qwen2.5-VL, Gemma 3/4).
UNSLOTH_VISION_PATTERNS = [
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mixer|mlp|feed_forward|ffn|dense|"
    r"mixer).*?(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))|(?:\bmodel\.layers\."
    r"[\d]{1,}\.(?:self_attn|attention|attn|mixer|mlp|feed_forward|ffn|dense|mixer)\.(?:(?:q_proj|"
    r"k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)))",
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?(?:q_proj"
    r"|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|proj|linear).*?)|(?:\bmodel\.layers\.[\d]"
    r"{1,}\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|"
    r"o_proj|gate_proj|up_proj|down_proj|proj|linear)))",
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mixer|mlp|feed_forward|ffn|dense|"
    r"mixer).*?\.(?:q_proj|v_proj|o_proj))|(?:\bmodel\.layers\.[\d]{1,}(?!.*\.experts\.\d)\.."
    r"*?(?:self_attn|attention|attn|mixer|mlp|feed_forward|ffn|dense|mixer).*?\.(?:(?:q_proj|"
    r"v_proj|o_proj)))",
]


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(.*)*x", NESTED),
        ("(a+)+b", NESTED),
        ("(?:.*a)+x", NESTED),
        ("(a|aa)*b", NESTED),
        ("(x|x){1,40}y", NESTED),
        (".*" * 5 + "x", TOO_MANY),
        (".*a" * 6 + "b", TOO_MANY),
        ("a?" * 20 + "a" * 20, TOO_MANY),
        (".?" * 9 + "." * 9 + "x", TOO_MANY),
        ("(.|..)" * 9 + "x", TOO_MANY),
        ("(a|aa)" * 9 + "b", TOO_MANY),  # 0.5 s on 48 a's at 24 groups
        ("(?:a|a)" * 9 + "b", TOO_MANY),  # a repeated alternative overlaps itself
        ("(?:.*?(?:a|aa).*?(?:a|aa).*?(?:a|aa)).*?b", TOO_MANY),  # 1 s on 128 a's
        ("(.*){40}x", TOO_MANY),
        ("(a|b|ab)" * 12, TOO_MANY),
        (r"(a)\1", "backreferences"),
        (r"(a)?(?(1)b|c)", "backreferences"),
        ("q" * (MAX_PATTERN_CHARS + 1), "characters long"),
        ("(" * 5000 + ")" * 5000, "characters long"),
        ("(?:" * 1000 + ")" * 1000, "nests groups too deeply"),
        ("(unclosed", "not a valid regular expression"),
        ("a{4294967296}", "not a valid regular expression"),
    ],
)
def test_unbounded_patterns_are_refused_with_the_reason(pattern, reason) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)) as caught:
        check_pattern("LoraConfig.rank_pattern key", pattern)
    assert str(caught.value).startswith("LoraConfig.rank_pattern key")


# Accepted wherever a config has a regex: as target_modules and as rank_pattern / alpha_pattern
# keys (which are matched inside (.*\.)?(key)$: one more open-ended repeat).
EVERYWHERE = [
    "q_proj",
    "model.layers.0.self_attn.q_proj",
    r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    r"^(?!.*vision_tower).*\.(q_proj|k_proj|v_proj)$",
    r"^((?!vision).)*\.(q_proj|v_proj)$",  # a plain-text lookahead inside a repeat
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    ".*decoder.*(SelfAttention|EncDecAttention).*(q|k|v|o)$",  # PEFT's docstring example
    r"layers\.(1[0-9]|2[0-3])\.mlp\.(gate|up)_proj",
    "(" + "|".join(f"model.layers.{i}.mlp.down_proj" for i in range(60)) + ")",
    "(" + "|".join(rf"model\.layers\.{i}\.mlp\.down_proj" for i in range(100)) + ")",
    ".?" * 5 + "." * 5 + "x",
    "(a|ab)" * 5 + "x",
    "(?:ab){3}c?d*",
    "(q|k)?_proj",
]
# Near the limit: accepted as target_modules (matched whole), not as pattern keys.
TARGET_MODULES_ONLY = [
    ".?" * 6 + "." * 6 + "x",
    "(a|ab)" * 8 + "x",  # overlapping strings, each a full choice: (a|aa) * 24 took 0.5 s
    ".*" * 4 + "x",
    *UNSLOTH_VISION_PATTERNS,
]


@pytest.mark.parametrize("pattern", EVERYWHERE)
def test_the_patterns_peft_users_write_are_accepted(pattern) -> None:
    check_pattern("LoraConfig.target_modules", pattern)
    LoraConfig(target_modules=pattern, rank_pattern={pattern: 4}, alpha_pattern={pattern: 2})


@pytest.mark.parametrize("pattern", TARGET_MODULES_ONLY)
def test_patterns_near_the_limit_are_accepted_as_target_modules(pattern) -> None:
    LoraConfig(target_modules=pattern)


@pytest.mark.parametrize(
    ("pattern", "enclosing"),
    [
        (".*.*.*.*x", 1),  # as a rank_pattern key: 136 ms on a 128-character name
        ("(.*)(.*)(.*)(.*)x", 1),  # 0.9 s
        ("(.)*(.)*(.)*(.)*x", 0),  # a group repeated: re's slow path, 0.24 s
        ("(?:ab|c)*" * 4 + "x", 0),
        ("(?:(?=.*x).)*", 0),  # a lookahead with choices inside a repeat: nested
    ],
)
def test_what_a_pattern_is_matched_inside_counts(pattern, enclosing) -> None:
    with pytest.raises(ValueError, match="refused"):
        check_pattern("LoraConfig.rank_pattern key", pattern, enclosing)
    if enclosing:
        with pytest.raises(ValueError, match=r"LoraConfig\.rank_pattern key .*refused"):
            LoraConfig(rank_pattern={pattern: 2})


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"target_modules": "(.*)*x"}, ["LoraConfig.target_modules '(.*)*x'", NESTED]),
        ({"exclude_modules": "(a+)+"}, ["LoraConfig.exclude_modules '(a+)+'", NESTED]),
        ({"rank_pattern": {"(.*)*x": 4}}, ["LoraConfig.rank_pattern key '(.*)*x'", NESTED]),
        ({"alpha_pattern": {"(.*)*x": 4}}, ["LoraConfig.alpha_pattern key '(.*)*x'", NESTED]),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(h+)+"},
            ["LoraConfig.layers_pattern '(h+)+'", NESTED],
        ),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["x", 3]},
            ["LoraConfig.layers_pattern 3", "expected a regex string"],
        ),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": 3},
            ["LoraConfig.layers_pattern=3"],
        ),
        ({"rank_pattern": {"x" * 10_000: 4}}, ["LoraConfig.rank_pattern key 'xxx", "10000"]),
    ],
)
def test_the_config_names_the_field_and_the_pattern(fields, words) -> None:
    with pytest.raises(ValueError) as caught:
        LoraConfig(**fields)
    message = str(caught.value)
    assert all(word in message for word in words), message
    assert len(message) < 600  # a 10 000-character key is not repeated whole


def test_rank_and_alpha_patterns_keep_peft_semantics() -> None:
    config = LoraConfig(
        r=8, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 3}, alpha_pattern={"o": 5}
    )
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.10.self_attn.q_proj") == 8  # suffix after a dot only
    assert config.rank_for("model.layers.3.self_attn.v_proj") == 3
    assert config.rank_for("model.layers.3.self_attn.xv_proj") == 8
    assert config.alpha_for("model.layers.3.self_attn.o") == 5
    assert config.alpha_for("model.layers.3.self_attn.o_proj") == 8


def test_pattern_dicts_are_bounded_in_all() -> None:
    three_stars = {f".*{i}.*{i}.*x": 2 for i in range(5)}  # each near the limit as a key
    LoraConfig(rank_pattern=three_stars)
    with pytest.raises(ValueError, match=r"LoraConfig\.rank_pattern is refused: its keys together"):
        LoraConfig(rank_pattern={**three_stars, ".*y.*y.*y": 2})
    many = {f"model.layers.{i}.q_proj": 2 for i in range(10_001)}
    with pytest.raises(
        ValueError, match=r"LoraConfig\.alpha_pattern has 10001 keys; at most 10000"
    ):
        LoraConfig(alpha_pattern=many)
    with pytest.raises(ValueError, match=r"LoraConfig\.rank_pattern key 3 is invalid"):
        LoraConfig(rank_pattern={3: 2})


@pytest.mark.parametrize(
    "pattern", ["(?i)(?:a|Ab|b|Ba)*c", "(?i:(?:k|Kb)*c)", "(?i)(?:k|\u212ab|b)*c"]
)
def test_branches_told_apart_only_by_case_count_as_choices_under_ignorecase(pattern):
    """Under (?i) 'a' and 'A' (and 'k' and the Kelvin sign) match the same character: such
    branches overlap, and repeating them backtracks exponentially (an inject hung on one)."""
    with pytest.raises(ValueError, match="refused"):
        check_pattern("target_modules", pattern)


def _vision_language_model() -> torch.nn.Module:
    """Module names as in a vision-language model: a vision tower beside the language model."""
    torch.manual_seed(0)

    def block(names: list[str]) -> torch.nn.Module:
        return torch.nn.ModuleDict({name: torch.nn.Linear(8, 8) for name in names})

    language = torch.nn.ModuleDict(
        {
            "layers": torch.nn.ModuleList(
                torch.nn.ModuleDict(
                    {
                        "self_attn": block(["q_proj", "k_proj", "v_proj", "o_proj"]),
                        "mlp": block(["gate_proj", "up_proj", "down_proj"]),
                    }
                )
                for _ in range(2)
            )
        }
    )
    visual = torch.nn.ModuleDict(
        {"blocks": torch.nn.ModuleList(block(["qkv", "proj", "fc1"]) for _ in range(2))}
    )
    return torch.nn.ModuleDict(
        {"model": torch.nn.ModuleDict({"language_model": language, "visual": visual})}
    )


@pytest.mark.parametrize("pattern", UNSLOTH_VISION_PATTERNS)
def test_an_unsloth_vision_adapter_loads_onto_the_modules_peft_adapts(tmp_path, pattern) -> None:
    """The file PEFT writes for Unsloth's regex loads into lorakit, onto the same modules, with
    the same values (the regex used to be refused by the backtracking estimate)."""
    import peft

    import lorakit

    config = peft.LoraConfig(r=2, target_modules=pattern, init_lora_weights=False)
    theirs = peft.get_peft_model(_vision_language_model(), config)
    theirs.save_pretrained(tmp_path)
    peft_adapted = {
        name.removeprefix("base_model.model.")
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    ours = lorakit.load_adapter(_vision_language_model(), tmp_path, activate=True)
    assert {name for name, _ in lorakit.state.lora_layers(ours)} == peft_adapted
    assert all(".visual." not in name for name in peft_adapted) and len(peft_adapted) >= 6
    x = torch.randn(3, 8)
    for name in sorted(peft_adapted):
        expected = theirs.get_submodule("base_model.model." + name)(x)
        torch.testing.assert_close(ours.get_submodule(name)(x), expected, rtol=0, atol=1e-6)
