"""MoE review fixes: transformers-4 per-expert adapter files load as in PEFT (io/moe_files.py),
a LoRA parameter layer is no target_modules target, expert shape messages say E x r."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import lorakit
from lorakit.errors import AdapterFileError, TargetModulesError
from tests.tiny_models import MOE_SIZES, mixtral, randomize_adapters

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
R, ALPHA = 2, 4
MIXTRAL_NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
QWEN_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    sizes = dict(MOE_SIZES, moe_intermediate_size=48, num_experts=4, decoder_sparse_step=1)
    sizes.pop("num_local_experts")
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**sizes)).eval()


def write_per_expert_file(
    directory, holder: str, names: dict, ranks=None, drop=None, patterns=None
) -> dict:
    """A transformers-4 era PEFT MoE adapter: one LoRA pair per expert module (non-zero B)."""
    hidden, inner, experts = MOE_SIZES["hidden_size"], 48, 4
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.{holder}.experts"
        for e in range(experts):
            for name, kind in names.items():
                r = (ranks or {}).get((e, name), R)
                k, d = (inner, hidden) if kind == "down" else (hidden, inner)
                key = f"{prefix}.{e}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, k, generator=generator) * 0.2
                tensors[f"{key}.lora_B.weight"] = torch.randn(d, r, generator=generator) * 0.2
    for key in drop or ():
        del tensors[key]
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=sorted(names)).to_dict()
    config.update(target_modules=sorted(names), peft_type="LORA", task_type=None)
    config.update(patterns or {})
    (directory / "adapter_config.json").write_text(json.dumps(config, default=str))
    return tensors


def per_expert_reference(
    base, tensors: dict, holder: str, names: dict, scales=None
) -> torch.Tensor:
    """float64 logits of the base with each expert's update s B A added to its own rows
    (``scales``: s per expert module name, default ALPHA / R)."""
    ref = copy.deepcopy(base).double()
    ref.config._experts_implementation = "eager"
    replaced = {}
    for layer in range(2):
        experts = ref.get_submodule(f"model.layers.{layer}.mlp.experts")
        gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
        inner = down.shape[-1]
        for e in range(gate_up.shape[0]):
            for name, kind in names.items():
                key = f"base_model.model.model.layers.{layer}.{holder}.experts.{e}.{name}"
                a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
                delta = (scales or {}).get(name, ALPHA / R) * b.double() @ a.double()
                if kind == "down":
                    down[e] += delta
                else:
                    rows = slice(0, inner) if kind == "gate" else slice(inner, 2 * inner)
                    gate_up[e, rows] += delta
        replaced[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
        replaced[f"model.layers.{layer}.mlp.experts.down_proj"] = down
    return torch.func.functional_call(ref, replaced, (IDS,)).logits


@pytest.mark.parametrize(
    "make, holder, names",
    [(mixtral, "block_sparse_moe", MIXTRAL_NAMES), (qwen3_moe, "mlp", QWEN_NAMES)],
    ids=["mixtral", "qwen3_moe"],
)
def test_per_expert_file_loads_as_peft_loads_it(tmp_path, make, holder, names):
    tensors = write_per_expert_file(tmp_path / "v4", holder, names)
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "v4")(IDS).logits
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "v4")
    got = model(IDS).logits
    assert (expected - base(IDS).logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    reference = per_expert_reference(base, tensors, holder, names)
    torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)
    config = lorakit.adapter_configs(model)["default"]
    assert sorted(config.target_parameters) == ["down_proj", "gate_up_proj"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 2 * R}


def test_loaded_per_expert_file_saves_in_the_fused_layout_peft_loads(tmp_path):
    write_per_expert_file(tmp_path / "v4", "block_sparse_moe", MIXTRAL_NAMES)
    model = lorakit.load_adapter(mixtral(), tmp_path / "v4")
    lorakit.save_adapter(model, tmp_path / "v5")
    keys = load_file(str(tmp_path / "v5" / "adapter_model.safetensors"))
    assert not any(".block_sparse_moe." in key or ".experts.0." in key for key in keys)
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (
        4 * 2 * R,
        MOE_SIZES["hidden_size"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(mixtral(), tmp_path / "v5")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_per_expert_file_with_the_router_renamed_as_peft_does(tmp_path):
    tensors = write_per_expert_file(tmp_path / "v4", "block_sparse_moe", MIXTRAL_NAMES)
    generator = torch.Generator().manual_seed(5)
    for layer in range(2):
        key = f"base_model.model.model.layers.{layer}.block_sparse_moe.gate"
        tensors[f"{key}.lora_A.weight"] = torch.randn(R, 64, generator=generator) * 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(4, R, generator=generator) * 0.5
    save_file(tensors, str(tmp_path / "v4" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "v4" / "adapter_config.json").read_text())
    config["target_modules"] = sorted([*MIXTRAL_NAMES, "gate"])
    (tmp_path / "v4" / "adapter_config.json").write_text(json.dumps(config))
    base = mixtral()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "v4")(IDS).logits
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "v4")
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=0)
    assert "gate.weight" in lorakit.adapter_configs(model)["default"].target_parameters


def test_per_expert_patterns_on_the_old_modules_become_the_fused_parameters(tmp_path):
    """rank_pattern / alpha_pattern keys naming the old expert modules ("w2") match nothing once
    fused: the fused parameter gets its experts' rank and alpha by a key of its own (PEFT
    drops the alpha, 0.36 off the per-expert sum, and cannot load the rank)."""
    ranks = {(e, "w2"): 4 for e in range(4)}
    patterns = {"rank_pattern": {"w2": 4}, "alpha_pattern": {"w2": 16}}
    tensors = write_per_expert_file(
        tmp_path / "v4", "block_sparse_moe", MIXTRAL_NAMES, ranks=ranks, patterns=patterns
    )
    base = mixtral()
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "v4")
    reference = per_expert_reference(
        base, tensors, "block_sparse_moe", MIXTRAL_NAMES, scales={"w2": 16 / 4}
    )
    torch.testing.assert_close(model(IDS).logits.double(), reference, atol=1e-5, rtol=0)
    config = lorakit.adapter_configs(model)["default"]
    assert config.rank_for("model.layers.1.mlp.experts.down_proj") == 4
    assert config.alpha_for("model.layers.1.mlp.experts.down_proj") == 16
    assert config.rank_for("model.layers.1.mlp.experts.gate_up_proj") == 2 * R


def test_per_expert_ranks_that_disagree_with_the_config_name_the_file_key(tmp_path):
    """The file's w2 factors have rank 4 and its config r=2: the message names the file's own
    key and both ranks (it named a fused key the file does not have, and another expert count)."""
    ranks = {(e, "w2"): 4 for e in range(4)}
    write_per_expert_file(tmp_path / "v4", "block_sparse_moe", MIXTRAL_NAMES, ranks=ranks)
    with pytest.raises(AdapterFileError) as refused:
        lorakit.load_adapter(mixtral(), tmp_path / "v4")
    message = str(refused.value)
    assert "block_sparse_moe.experts.0.w2.lora_A.weight has rank 4" in message
    assert f"rank {R} (r / rank_pattern)" in message and "experts (at rank" not in message


def test_per_expert_file_missing_an_expert_is_refused(tmp_path):
    key = "base_model.model.model.layers.1.block_sparse_moe.experts.3.w3.lora_{}.weight"
    drop = [key.format("A"), key.format("B")]
    write_per_expert_file(tmp_path / "v4", "block_sparse_moe", MIXTRAL_NAMES, drop=drop)
    model = mixtral()
    before = model(IDS).logits
    with pytest.raises(AdapterFileError, match=r"experts \[0, 1, 2\].*4 experts.*peft"):
        lorakit.load_adapter(model, tmp_path / "v4")
    assert lorakit.adapter_configs(model) == {}
    torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_per_expert_file_with_ranks_that_differ_is_refused(tmp_path):
    ranks = {(1, "w1"): 3}
    write_per_expert_file(tmp_path / "v4", "block_sparse_moe", MIXTRAL_NAMES, ranks=ranks)
    with pytest.raises(AdapterFileError, match=r"experts\.1\.w1.*one shape, rank.*peft"):
        lorakit.load_adapter(mixtral(), tmp_path / "v4")


def _with_parameter_adapter():
    config = lorakit.LoraConfig(r=R, target_parameters=EXPERTS, target_modules=[])
    model = lorakit.inject(mixtral(), config)
    randomize_adapters(model, std=0.2)
    return model


def test_target_modules_naming_a_parameter_layer_is_refused():
    model = _with_parameter_adapter()
    before, state = model(IDS).logits, {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetModulesError, match=r"model\.layers\.0\.mlp\.experts.*target_param"):
        lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["experts"]), adapter_name="d")
    assert list(lorakit.adapter_configs(model)) == ["default"]
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_file_targeting_a_parameter_layer_gives_adapter_file_error(tmp_path):
    config = peft.LoraConfig(r=3, target_modules=["experts"]).to_dict()
    config.update(target_modules=["experts"], peft_type="LORA", task_type=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, default=str))
    key = "base_model.model.model.layers.{}.mlp.experts.lora_{}.weight"
    tensors = {key.format(i, "A"): torch.ones(3, 48) for i in range(2)}
    tensors |= {key.format(i, "B"): torch.ones(64, 3) for i in range(2)}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = _with_parameter_adapter()
    before = model(IDS).logits
    with pytest.raises(AdapterFileError, match=r"experts.*target_parameters"):
        lorakit.load_adapter(model, tmp_path, adapter_name="d")
    torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)


def _saved_parameter_adapter(directory):
    lorakit.save_adapter(_with_parameter_adapter(), directory)


def test_expert_shape_message_says_e_times_r_on_another_expert_count(tmp_path):
    _saved_parameter_adapter(tmp_path)
    torch.manual_seed(0)
    eight = MixtralForCausalLM(MixtralConfig(**(MOE_SIZES | dict(num_local_experts=8)))).eval()
    with pytest.raises(AdapterFileError) as raised:
        lorakit.load_adapter(eight, tmp_path)
    message = str(raised.value)
    assert "E x r = 8 x 2 = 16" in message
    assert "8 = 8 x 1" in message and "4 experts (at rank 2)" in message
    assert "model.layers.0.mlp.experts.gate_up_proj" in message
    assert "the tensor has rank" not in message


def test_expert_shape_message_on_rows_not_divisible_by_e(tmp_path):
    _saved_parameter_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    tensors[key] = tensors[key][:7].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError) as raised:
        lorakit.load_adapter(mixtral(), tmp_path)
    message = str(raised.value)
    assert "E x r = 4 x 2 = 8" in message and "another number of experts" in message
    assert "model.layers.0.mlp.experts.down_proj" in message
    assert "the tensor has rank" not in message
