"""PEFT 0.22's MoE target conversion (``lorakit.moe_entries``), against the installed peft
where it is 0.22 and against written-out values (and float64 references) under either:
Qwen2-MoE converted, its shared expert kept as linear layers beside the routed experts; a
moved entry keeping its path; a file takes the rule of the PEFT that wrote it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import TargetModulesError
from lorakit.io.adapter_dirs import CONFIG_METADATA_KEY
from lorakit.moe_targets import convert_moe_config
from tests import tiny_models
from tests.peft_versions import peft_converts_moe_targets_by_path
from tests.test_core_review_fixes import _qwen2_moe
from tests.test_moe_review_fixes33 import (
    _deepseek_v3,
    _peft,
    _peft_load,
    _reference,
    _write_transformers4_file,
)

IDS = tiny_models.input_ids(batch=2, length=7)
R, ALPHA = 2, 4
LIST = ["q_proj", "gate_proj", "up_proj", "down_proj"]
SHARED = [f"model.layers.{i}.mlp.shared_expert.{n}" for i in (0, 1) for n in LIST[1:]]
QUERIES = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
EXPERTS = [
    f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("gate_up_proj", "down_proj")
]


def _adapted(model) -> set[str]:
    """What ``model``'s adapter adapts (lorakit's or PEFT's): a module's path, or a module's
    path and parameter name (``...mlp.experts.gate_up_proj``)."""
    found = set()
    for name, _ in model.named_parameters():
        if ".lora_A" not in name:
            continue
        path = name.split(".lora_A")[0]
        parameter = getattr(model.get_submodule(path), "parameter_name", None)
        owner = path.removeprefix("base_model.model.").replace(".base_layer", "")
        found.add(f"{owner}.{parameter}" if parameter else owner)
    return found


def test_rule_release_reads_peft_version():
    from lorakit.moe_entries import PEFT_022, file_peft_version, rule_release

    assert [rule_release(v) for v in ("0.21.2", "0.17.0", "0.22.0", "0.23.1.dev0")] == [
        (0, 21),
        (0, 21),
        PEFT_022,
        PEFT_022,
    ]
    assert rule_release(None) == rule_release("garbage") == PEFT_022
    assert file_peft_version('{"peft_version": "0.21.2"}') == "0.21.2"
    assert file_peft_version("{}") is file_peft_version("not json") is None


def test_qwen2_moe_list_adapts_the_shared_and_the_routed_experts_as_peft_022():
    """Before: Qwen2-MoE was not converted (PEFT 0.21's rule), so the list adapted the shared
    expert only. Now: its linear ``shared_expert`` layers and the fused routed experts, rank and
    alpha doubled on ``gate_up_proj``; the same layers and logits as PEFT 0.22 with the same
    factors."""
    base = _qwen2_moe()
    config = lorakit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LIST)
    model = lorakit.inject(copy.deepcopy(base), config)
    recorded = lorakit.adapter_configs(model)["default"]
    assert (recorded.target_modules, recorded.target_parameters) == (
        sorted(LIST),
        ["down_proj", "gate_up_proj"],
    )
    expected = set(SHARED) | set(QUERIES) | set(EXPERTS)
    layer = model.get_submodule("model.layers.0.mlp.experts")
    assert (layer.parameter_name, layer.ranks["default"], layer.scalings["default"]) == (
        "down_proj",
        R,
        ALPHA / R,
    )
    assert model.get_submodule("model.layers.0.mlp.experts.base_layer").ranks["default"] == 2 * R
    if not peft_converts_moe_targets_by_path():
        assert _adapted(model) == expected
        return
    theirs = _peft(base, r=R, lora_alpha=ALPHA, target_modules=LIST)
    assert _adapted(theirs) == _adapted(model) == expected
    tiny_models.randomize_adapters(model, std=0.2)
    ours = {f"base_model.model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
    assert not theirs.load_state_dict(ours, strict=False).unexpected_keys
    got = model(IDS).logits
    assert (got - base(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, theirs(IDS).logits, atol=1e-5, rtol=0)


def test_a_moved_entry_keeps_its_path_in_the_file_as_peft_022_writes_it(tmp_path):
    """``mlp.experts.w1`` on Mixtral becomes ``mlp.experts.gate_up_proj`` (PEFT 0.21: the bare
    ``gate_up_proj``); the file's config and keys are PEFT 0.22's, and load back equal."""
    base = tiny_models.mixtral()
    fields = dict(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "mlp.experts.w1", "w3"])
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**fields))
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj"]
    assert written["target_parameters"] == ["gate_up_proj", "mlp.experts.gate_up_proj"]
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert {k for k in keys if "lora_A" in k} == {
        f"base_model.model.model.layers.{i}.{path}.lora_A.weight"
        for i in (0, 1)
        for path in ("self_attn.q_proj", "mlp.experts")
    }
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(again(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    if not peft_converts_moe_targets_by_path():
        return
    _peft(base, **fields).save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(theirs["target_modules"]) == written["target_modules"]
    assert sorted(theirs["target_parameters"]) == written["target_parameters"]
    assert set(load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))) == keys
    loaded = _peft_load(base, tmp_path / "ours")(IDS).logits
    torch.testing.assert_close(loaded, model(IDS).logits, atol=1e-5, rtol=0)


def _shared_only_file(tmp_path, base, peft_version: str | None):
    """A Qwen2-MoE file as PEFT 0.21 writes it for ``target_modules=LIST`` (not converted:
    the shared expert's and q_proj's tensors), its ``peft_version`` set (None: absent), and
    the logits of the model it was saved from."""
    full = ["q_proj"] + [f"shared_expert.{n}" for n in LIST[1:]]  # the same layers, by path
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=R, target_modules=full))
    tiny_models.randomize_adapters(model, std=0.2)
    directory = lorakit.save_adapter(model, tmp_path / f"v{peft_version}")
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(target_modules=LIST, peft_version=peft_version)
    config = {k: v for k, v in config.items() if v is not None or k != "peft_version"}
    text = json.dumps(config)
    (directory / "adapter_config.json").write_text(text)
    weights = str(directory / "adapter_model.safetensors")
    metadata = {"format": "pt"}  # PEFT's; lorakit's own file also holds its config
    metadata |= {CONFIG_METADATA_KEY: text} if peft_version is None else {}
    save_file(load_file(weights), weights, metadata=metadata)
    return directory, model(IDS).logits


def test_a_qwen2_moe_file_of_peft_021_loads_onto_the_layers_its_writer_adapted(tmp_path):
    """Decision 2: under PEFT 0.22's rule ``gate_proj`` on Qwen2-MoE would also ask for the
    routed experts, which a PEFT 0.21 file (shared expert only) lacks; the file's
    ``peft_version`` 0.21.2 gives 0.21's rule, so it loads exactly as saved, as the installed
    peft loads it (PEFT 0.22: the routed experts at B = 0)."""
    base = _qwen2_moe()
    directory, saved = _shared_only_file(tmp_path, base, "0.21.2")
    model = lorakit.load_adapter(copy.deepcopy(base), directory)
    assert _adapted(model) == set(SHARED) | set(QUERIES)
    got = model(IDS).logits
    assert (got - base(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, saved, atol=0, rtol=0)
    torch.testing.assert_close(_peft_load(base, directory)(IDS).logits, got, atol=1e-5, rtol=0)


def test_a_qwen2_moe_peft_021_config_converts_as_peft_021_did():
    """``written_by`` below 0.22: Qwen2-MoE's config is left as it is, and a Mixtral entry
    moves to the bare new name, as PEFT 0.21 converted them."""
    config = lorakit.LoraConfig(r=R, target_modules=LIST)
    assert convert_moe_config(_qwen2_moe(), config, written_by="0.21.2") is config
    mixtral = lorakit.LoraConfig(r=R, target_modules=["q_proj", "mlp.experts.w1", "w3"])
    converted = convert_moe_config(tiny_models.mixtral(), mixtral, written_by="0.21.2")
    assert (converted.target_modules, converted.target_parameters) == (["q_proj"], ["gate_up_proj"])


def test_a_transformers4_deepseek_file_of_peft_022_loads_unedited_as_trained(tmp_path):
    """Before: refused (PEFT 0.21's rule dropped the dense and shared MLPs' tensors). A file
    PEFT 0.22 wrote takes 0.22's rule: its dense and shared layers stay targets beside the
    fused routed experts, so it loads as trained (float64 per-expert reference), as the
    installed peft 0.22 loads it."""
    base = _deepseek_v3()
    directory = tmp_path / "v4"
    tensors = _write_transformers4_file(directory, peft_version="0.22.0")
    got = lorakit.load_adapter(copy.deepcopy(base), directory)(IDS).logits
    reference = _reference(base, tensors)
    assert (reference - base(IDS).logits.double()).abs().max() > 1e-2
    torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)
    if peft_converts_moe_targets_by_path():
        torch.testing.assert_close(_peft_load(base, directory)(IDS).logits, got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_a_half_pair_next_to_linear_layers_is_refused_as_peft_022_refuses(family):
    """``["up_proj"]``: the shared expert's ``up_proj`` stays a linear target and the routed
    experts' ``gate_up_proj`` would be half adapted: refused (PEFT 0.22 refuses it too)."""
    base = _qwen2_moe() if family == "qwen2_moe" else _deepseek_v3()
    with pytest.raises(TargetModulesError, match="fused"):
        lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["up_proj"]))
    if peft_converts_moe_targets_by_path():
        with pytest.raises(ValueError, match="without also targeting gate_proj"):
            _peft(base, target_modules=["up_proj"])


def test_a_qwen2_moe_file_of_lorakit_before_022_rules_loads_as_it_was_saved(tmp_path):
    """A file lorakit wrote while it followed PEFT 0.21 (no ``peft_version``; Qwen2-MoE's
    shared expert only) would read, by 0.22's rule, as lacking the routed experts
    ("incomplete"); holding no routed-expert tensor, it takes 0.21's rule and loads exactly as
    saved (PEFT 0.22 loads it with the routed experts at B = 0: the same logits)."""
    base = _qwen2_moe()
    directory, saved = _shared_only_file(tmp_path, base, None)
    assert "peft_version" not in json.loads((directory / "adapter_config.json").read_text())
    model = lorakit.load_adapter(copy.deepcopy(base), directory)
    assert _adapted(model) == set(SHARED) | set(QUERIES)
    got = model(IDS).logits
    assert (got - base(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, saved, atol=0, rtol=0)
    torch.testing.assert_close(_peft_load(base, directory)(IDS).logits, got, atol=1e-5, rtol=0)
