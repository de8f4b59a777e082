"""Fixes from the core review: saving while merged, loading into a merged layer, the
``out_proj`` of ``nn.MultiheadAttention`` under "all-linear", and PEFT's conversion of MoE
targets for the architectures transformers 5 fused.

Each test checks values (non-zero ``lora_B``), with PEFT 0.21 as the oracle where it applies.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.errors import TargetModulesError
from lorakit.io import load as load_module
from lorakit.state import lora_layers
from tests import tiny_models
from tests.peft_versions import peft_converts_moe_targets_by_path

WEIGHTS = "adapter_model.safetensors"


def _file_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(f"{directory}/{WEIGHTS}")


def _assert_same_files(first, second) -> None:
    """Two saved adapters with bit-identical tensors (and identical bytes)."""
    a, b = _file_tensors(first), _file_tensors(second)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (first / WEIGHTS).read_bytes() == (second / WEIGHTS).read_bytes()


# --------------------------------------------------------------------------- bug 1: save merged
def test_saving_while_merged_writes_the_original_base_bias(tmp_path) -> None:
    base = tiny_models.gpt2()
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", lora_bias=True
    )
    model = lorakit.inject(copy.deepcopy(base), config)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "unmerged")
    lorakit.merge(model)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.merged_adapters == ("default",)
    lorakit.save_adapter(model, tmp_path / "merged")
    _assert_same_files(tmp_path / "unmerged", tmp_path / "merged")
    key = "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
    saved = _file_tensors(tmp_path / "merged")[key]
    assert torch.equal(saved, base.transformer.h[0].attn.c_attn.bias.detach())
    assert (layer.base_layer.bias - saved).abs().max() > 1e-2  # the live bias holds s b
    for directory in ("unmerged", "merged"):
        loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / directory)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)


def test_saving_while_merged_writes_the_original_embedding_table(tmp_path) -> None:
    base = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    model = lorakit.inject(copy.deepcopy(base), config)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "unmerged", save_embedding_layers=True)
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path / "merged", save_embedding_layers=True)
    _assert_same_files(tmp_path / "unmerged", tmp_path / "merged")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    saved = _file_tensors(tmp_path / "merged")[key]
    assert torch.equal(saved, base.model.embed_tokens.weight.detach())
    outputs = []
    for directory in ("unmerged", "merged"):
        loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / directory)
        with torch.no_grad():
            outputs.append(loaded(ids).logits)
        torch.testing.assert_close(outputs[-1], expected, rtol=0, atol=1e-5)
    assert torch.equal(outputs[0], outputs[1])


# --------------------------------------------------------------------------- bug 2: load merged
def _file_with_other_table(base, directory) -> torch.Tensor:
    """Save adapter "b" on ``embed_tokens`` of a copy of ``base`` whose table was changed (a
    resized or retrained vocabulary), table included; returns that table."""
    source = copy.deepcopy(base)
    with torch.no_grad():
        source.model.embed_tokens.weight.add_(0.5)
    lorakit.inject(source, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    tiny_models.randomize_adapters(source, std=0.2, seed=9)
    lorakit.save_adapter(source, directory, save_embedding_layers=True)
    return source.model.embed_tokens.base_layer.weight.detach().clone()


def _merged_a(base) -> nn.Module:
    """A copy of ``base`` holding adapter "a" on ``embed_tokens``, merged."""
    model = copy.deepcopy(base)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    lorakit.inject(model, config, "a")
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.merge(model)
    return model


def test_loading_a_base_table_into_a_merged_layer_keeps_the_merged_adapter(tmp_path) -> None:
    base = tiny_models.llama()
    table = _file_with_other_table(base, tmp_path)
    model = _merged_a(base)
    layer = model.model.embed_tokens
    delta_a = layer.delta_weight("a")
    lorakit.load_adapter(model, tmp_path, "b")  # "a" stays the active, merged adapter
    assert layer.merged_adapters == ("a",) and lorakit.active_adapters(model) == ("a",)
    assert torch.equal(layer.original_weight, table)  # the file's table is the base now
    expected_weight = (table.to(torch.float32) + delta_a).to(table.dtype)
    torch.testing.assert_close(layer.base_layer.weight, expected_weight, rtol=0, atol=1e-6)
    # reference: a model whose base has the file's table, with "a" unmerged
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(table)
    lorakit.inject(
        reference, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]), "a"
    )
    with torch.no_grad():
        for mine, theirs in zip(
            layer.adapter_parameters("a"),
            reference.model.embed_tokens.adapter_parameters("a"),
            strict=True,
        ):
            theirs.copy_(mine)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
        assert (expected - base(ids).logits).abs().max() > 1e-2
        lorakit.unmerge(model)
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)


def test_a_failed_load_into_a_merged_layer_puts_everything_back(tmp_path, monkeypatch) -> None:
    base = tiny_models.llama()
    _file_with_other_table(base, tmp_path)
    model = _merged_a(base)
    layer = model.model.embed_tokens
    original, merged = layer.original_weight.detach().clone(), layer.weight.detach().clone()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        before = model(ids).logits

    def fail(rewrites) -> None:
        raise RuntimeError("injected failure after the copy")

    monkeypatch.setattr(load_module, "write_rewrites", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        lorakit.load_adapter(model, tmp_path, "b")
    assert sorted(lorakit.adapter_configs(model)) == ["a"]
    assert layer.merged_adapters == ("a",)
    assert torch.equal(layer.original_weight, original)
    assert torch.equal(layer.weight, merged)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


# --------------------------------------------------------------------------- bug 3: MHA out_proj
class _Attention(nn.Module):
    """An ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` itself) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _attention_model() -> _Attention:
    torch.manual_seed(0)
    return _Attention().eval()


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_all_linear_leaves_the_out_proj_of_multihead_attention_out() -> None:
    base = _attention_model()
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    assert lorakit.find_targets(base, config) == ["head"]
    model = lorakit.inject(copy.deepcopy(base), config)
    tiny_models.randomize_adapters(model, std=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(
                r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False
            ),
        )
        only_head = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["head"])
        )
    assert _trainable(model) == _trainable(only_head) == 2 * (16 + 4)
    with torch.no_grad():  # PEFT's out_proj adapter (B != 0 here) never runs: same outputs
        head = reference.base_model.model.head
        head.lora_A["default"].weight.copy_(model.head.lora_A["default"].weight)
        head.lora_B["default"].weight.copy_(model.head.lora_B["default"].weight)
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
        actual = model(x)
        torch.testing.assert_close(actual, reference(x), rtol=0, atol=1e-6)
        assert (actual - base(x)).abs().max() > 1e-2


@pytest.mark.parametrize("targets", [["attn.out_proj", "head"], ["out_proj"], r".*out_proj"])
def test_naming_the_out_proj_of_multihead_attention_is_refused(targets) -> None:
    model = _attention_model()
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    with pytest.raises(TargetModulesError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        lorakit.inject(model, config)
    assert not list(lora_layers(model))  # nothing was wrapped
    excluded = config.replace(exclude_modules=["out_proj"], target_modules=["head", "out_proj"])
    assert lorakit.find_targets(model, excluded) == ["head"]


# --------------------------------------------------------------------------- bug 4: fused MoE
MOE_SIZES = dict(
    tiny_models.DECODER_SIZES,
    intermediate_size=48,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=4,
    num_experts_per_tok=2,
)


def _qwen3_moe(seed: int = 0) -> nn.Module:
    """A tiny Qwen3-MoE (model type mapped to "qwen2_moe": PEFT converts its targets)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE_SIZES)).eval()


def _qwen2_moe(seed: int = 0) -> nn.Module:
    """A tiny Qwen2-MoE (PEFT 0.21 leaves its targets as they are)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**MOE_SIZES)).eval()


MOE_BUILDERS = {"mixtral": tiny_models.mixtral, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe}
MOE_CONFIGS = [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(target_modules=["w1", "w3", "w2", "gate"]),
    dict(target_modules=["q_proj", "mlp.experts.w1", "w3"], target_parameters=["down_proj"]),
    dict(target_modules=r".*\.(q_proj|w1|w3|gate_proj|up_proj)"),
    dict(target_modules=r"model\.layers\.0\.self_attn\.q_proj"),  # PEFT widens it to q_proj
    dict(target_modules=r".*(gate|w2)", exclude_modules=r".*layers\.1.*"),
    dict(target_modules="all-linear", rank_pattern={"q_proj": 3}, alpha_pattern={"w2": 5}),
    dict(target_modules=["w1"]),
    dict(target_modules=["up_proj"]),
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_parameters=["gate_up_proj"]),
]


_GATE_UP = {r".*\.gate_up_proj": 4}, {r".*\.gate_up_proj": 8}  # (r, alpha) x 2
_QWEN2_ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj"]
_QWEN2_ALL_LINEAR += ["shared_expert_gate", "up_proj", "v_proj"]
# PEFT 0.22's conversion where it differs from 0.21's (``peft_converts_moe_targets_by_path``):
# lorakit follows 0.22; under an older peft these written-out values are the expectation.
# ``{(family, index into MOE_CONFIGS): converted fields, or "refused"}``.
PEFT_022_MOE_CONVERSIONS = {
    ("mixtral", 3): (
        ["q_proj"],
        ["down_proj", "gate_up_proj", "mlp.experts.gate_up_proj"],
        *_GATE_UP,
    ),
    ("qwen2_moe", 0): (_QWEN2_ALL_LINEAR, ["down_proj", "gate.weight", "gate_up_proj"], *_GATE_UP),
    ("qwen2_moe", 1): (
        ["down_proj", "gate_proj", "q_proj", "up_proj"],
        ["down_proj", "gate_up_proj"],
        *_GATE_UP,
    ),
    ("qwen2_moe", 2): (["w1", "w2", "w3"], ["gate.weight"], {}, {}),
    ("qwen2_moe", 4): (["gate_proj", "q_proj", "up_proj"], ["gate_up_proj"], *_GATE_UP),
    ("qwen2_moe", 5): (["q_proj"], None, {}, {}),
    ("qwen2_moe", 6): (["shared_expert_gate"], ["gate.weight"], {}, {}),
    ("qwen2_moe", 7): (
        _QWEN2_ALL_LINEAR,
        ["down_proj", "gate.weight", "gate_up_proj"],
        {"q_proj": 3, r".*\.gate_up_proj": 4},
        {"w2": 5, r".*\.gate_up_proj": 8},
    ),
    ("qwen2_moe", 9): "refused",
}


def _expected_conversion(model: nn.Module, family: str, settings: dict):
    """The installed peft's conversion, or 0.22's written out where an older peft's differs
    (checked against peft itself from 0.22 on)."""
    expected = _peft_converted(model, settings)
    known = PEFT_022_MOE_CONVERSIONS.get((family, MOE_CONFIGS.index(settings)))
    if known is None:
        return expected
    if peft_converts_moe_targets_by_path():
        assert expected == known  # the table is peft 0.22's
    else:
        assert expected != known  # (a case where the releases differ)
    return known


def _peft_converted(model: nn.Module, settings: dict):
    """PEFT's conversion of ``settings`` for ``model`` (the fields that change), or "refused"."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    config = peft.LoraConfig(r=2, lora_alpha=4, **copy.deepcopy(settings))
    try:
        convert_peft_config_for_transformers(config, model, None)
    except ValueError:
        return "refused"
    return _converted_fields(config)


def _converted_fields(config):
    modules = config.target_modules
    return (
        modules if isinstance(modules, str) or modules is None else sorted(modules),
        sorted(config.target_parameters) if config.target_parameters else None,
        dict(config.rank_pattern or {}),
        dict(config.alpha_pattern or {}),
    )


@pytest.mark.parametrize("family", sorted(MOE_BUILDERS))
@pytest.mark.parametrize("settings", MOE_CONFIGS, ids=str)
def test_moe_targets_are_converted_as_peft_converts_them(family, settings) -> None:
    from lorakit.moe_targets import convert_moe_config

    model = MOE_BUILDERS[family]()
    expected = _expected_conversion(model, family, settings)
    config = lorakit.LoraConfig(r=2, lora_alpha=4, **copy.deepcopy(settings))
    try:
        converted = convert_moe_config(model, config)
    except TargetModulesError as error:
        assert expected == "refused", error
        assert "fused" in str(error)
        return
    got = _converted_fields(converted)
    if settings.get("target_modules") is None:  # PEFT may turn None into an empty set: the
        got, expected = got[1:], expected[1:]  # same targets (none of these types has a default)
    assert got == expected
    assert convert_moe_config(model, converted) is converted  # converting again: no change


def _peft_trainable(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's trainable tensors under lorakit's names (prefix and nothing else removed)."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): p for name, p in peft_model.named_parameters() if p.requires_grad
    }


def _moe_pair(base, settings):
    """(lorakit model, PEFT model) of ``settings`` on copies of ``base``, lorakit's factors
    random and copied into PEFT's."""

    config = lorakit.LoraConfig(r=2, lora_alpha=4, **settings)
    model = lorakit.inject(copy.deepcopy(base), config)  # inject converts it as PEFT does
    tiny_models.randomize_adapters(model, std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, **settings)
        )
    theirs = _peft_trainable(reference)
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(theirs)  # the same tensors, under the same names
    with torch.no_grad():
        for name, parameter in mine.items():
            assert parameter.shape == theirs[name].shape, name
            theirs[name].copy_(parameter)
    return model, reference


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_all_linear_on_a_fused_moe_equals_peft(family) -> None:
    base = MOE_BUILDERS[family]()
    model, reference = _moe_pair(base, dict(target_modules="all-linear"))
    assert _trainable(model) == reference.get_nb_trainable_parameters()[0]
    layer = model.get_submodule("model.layers.0.mlp.experts.base_layer")
    assert (layer.parameter_name, layer.ranks["default"], layer.scalings["default"]) == (
        "gate_up_proj",
        4,
        2.0,
    )
    ids = tiny_models.input_ids()
    mine, theirs = model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=1e-5)
    assert (mine.logits - base(ids).logits).abs().max() > 1e-2
    mine.loss.backward()
    theirs.loss.backward()
    peft_grads = _peft_trainable(reference)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(
                parameter.grad, peft_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name
            )


def test_a_fused_moe_adapter_is_saved_as_peft_saves_it_and_loads_both_ways(tmp_path) -> None:
    import json

    base = tiny_models.mixtral()
    model, reference = _moe_pair(base, dict(target_modules="all-linear"))
    lorakit.save_adapter(model, tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_path / "peft")
    ours, theirs = (
        json.loads((tmp_path / name / "adapter_config.json").read_text())
        for name in ("lorakit", "peft")
    )
    for key in ("target_modules", "target_parameters"):
        assert sorted(ours[key]) == sorted(theirs[key]), key
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert ours[key] == theirs[key], key
    assert sorted(_file_tensors(tmp_path / "lorakit")) == sorted(_file_tensors(tmp_path / "peft"))
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit")
        torch.testing.assert_close(by_peft(ids).logits, expected, rtol=0, atol=1e-5)
        by_lorakit = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
        torch.testing.assert_close(by_lorakit(ids).logits, expected, rtol=0, atol=1e-5)


def test_a_file_saying_all_linear_on_a_fused_moe_loads_as_peft_loads_it(tmp_path) -> None:
    """A config written before the conversion (``"all-linear"``, no target_parameters): PEFT
    converts it when it loads the file; so does lorakit."""
    import json

    base = tiny_models.mixtral()
    _, reference = _moe_pair(base, dict(target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    values = json.loads(path.read_text())
    values |= dict(target_modules="all-linear", target_parameters=None)
    values |= dict(rank_pattern={}, alpha_pattern={})
    path.write_text(json.dumps(values))
    ids = tiny_models.input_ids()
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
            expected = by_peft(ids).logits
        torch.testing.assert_close(expected, reference(ids).logits, rtol=0, atol=1e-5)
        loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
    config = lorakit.adapter_configs(loaded)["default"]
    assert config.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 4}


def test_inject_converts_all_linear_on_a_fused_moe() -> None:
    model = lorakit.inject(tiny_models.mixtral(), lorakit.LoraConfig(target_modules="all-linear"))
    config = lorakit.adapter_configs(model)["default"]
    assert config.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 16}
    assert "model.layers.0.mlp.experts" in dict(lora_layers(model))
