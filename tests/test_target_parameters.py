"""LoRA on bare parameters (``target_parameters``): the fused 3-D expert weights of tiny random
Mixtral (experts stored (E, out, in)) and GPT-OSS (stored (E, in, out)) models, against PEFT
0.21's ``ParamWrapper`` and a float64 reference written out expert by expert."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import TargetModulesError
from lorakit.layers.parameter import LoraParameter
from lorakit.state import lora_layers
from tests.tiny_models import gpt_oss, mixtral, randomize_adapters, sgd_steps
from tests.tiny_models import llama as tiny_llama

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
BUILDERS = {"mixtral": mixtral, "gpt_oss": gpt_oss}


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _config(**changes) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**(dict(r=2, lora_alpha=4, target_parameters=EXPERTS) | changes))


def _peft_model(base, **changes):
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, **changes
    )
    return peft.get_peft_model(base, config)


def _copy_factors_into_peft(model, peft_model) -> None:
    """PEFT's tensors set to lorakit's (same paths; PEFT's carry the prefix)."""
    peft_state = peft_model.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                peft_state[f"base_model.model.{key}"].copy_(value)


def _reference_weight(W0, lora_A, lora_B, scale, transposed):
    """``W0 + delta`` in float64, one expert at a time: expert e's factors are rows
    ``e r .. e r + r - 1`` of A and columns ``e, e + E, ...`` of B (PEFT's reshapes)."""
    experts = W0.shape[0]
    rank = lora_A.shape[0] // experts
    blocks = []
    for e in range(experts):
        A_e = lora_A[e * rank : (e + 1) * rank].double()
        B_e = torch.stack([lora_B[:, j * experts + e] for j in range(rank)], dim=1).double()
        delta = scale * B_e @ A_e  # (out, in)
        blocks.append(delta.T if transposed else delta)
    return W0.double() + torch.stack(blocks)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_forward_equals_peft_with_the_same_nonzero_factors(family) -> None:
    base = BUILDERS[family]()
    model = lorakit.inject(copy.deepcopy(base), _config())
    randomize_adapters(model, std=0.2)
    reference = _peft_model(copy.deepcopy(base))
    _copy_factors_into_peft(model, reference)
    ids = _ids()
    expected, base_out = reference(ids).logits, base(ids).logits
    actual = model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert (actual - base_out).abs().max() > 1e-2  # the adapter changes the output


def test_layers_nest_per_module_as_peft_does() -> None:
    model = lorakit.inject(mixtral(), _config())
    layers = dict(lora_layers(model))
    outer, inner = (
        layers["model.layers.0.mlp.experts"],
        layers["model.layers.0.mlp.experts.base_layer"],
    )
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    assert tuple(inner.lora_A["default"].weight.shape) == (4 * 2, 64)  # (E r, in)
    assert tuple(inner.lora_B["default"].weight.shape) == (96, 4 * 2)  # (out, E r)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_gradients_match_a_float64_reference(family) -> None:
    base = BUILDERS[family]().double()
    base.config._experts_implementation = "eager"  # grouped_mm takes no float64
    model = lorakit.inject(copy.deepcopy(base), _config())
    randomize_adapters(model, std=0.2)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    replaced, leaves = {}, []
    for path, layer in lora_layers(model):
        lora_A, lora_B = (
            p.detach().clone().requires_grad_() for p in layer.adapter_parameters("default")
        )
        leaves.append((layer, lora_A, lora_B))
        W0 = getattr(base.get_submodule(path.split(".base_layer")[0]), layer.parameter_name)
        weight = _reference_weight(W0.detach(), lora_A, lora_B, 2.0, layer.transposed)
        replaced[layer.parameter_path(path)] = weight
    loss = torch.func.functional_call(base, replaced, (ids,), {"labels": ids}).loss
    loss.backward()
    for layer, lora_A, lora_B in leaves:
        got_A, got_B = (p.grad for p in layer.adapter_parameters("default"))
        torch.testing.assert_close(got_A, lora_A.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_B, lora_B.grad, rtol=1e-9, atol=1e-12)
        assert got_B.abs().max() > 0


def test_training_steps_change_the_factors_and_lower_the_loss() -> None:
    model = lorakit.inject(mixtral(), _config())  # B = 0: the first forward is the base's
    ids = _ids()
    before = model(ids, labels=ids).loss.item()
    parameters = sgd_steps(model, ids, steps=5, lr=0.5)
    assert len(parameters) == 8  # A and B of 2 parameters x 2 layers
    assert all(p.abs().max() > 0 for p in parameters)
    assert model(ids, labels=ids).loss.item() < before


def test_merge_adds_the_delta_and_unmerge_restores_the_weight_exactly() -> None:
    model = lorakit.inject(mixtral(), _config())
    randomize_adapters(model, std=0.2)
    ids = _ids()
    unmerged = model(ids).logits
    layer = model.get_submodule("model.layers.1.mlp.experts.base_layer")
    experts = model.get_submodule("model.layers.1.mlp.experts.base_layer.base_layer")
    original = experts.gate_up_proj
    lora_A, lora_B = layer.adapter_parameters("default")
    expected = _reference_weight(original.detach(), lora_A.detach(), lora_B.detach(), 2.0, False)
    lorakit.merge(model)
    torch.testing.assert_close(experts.gate_up_proj.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    with lorakit.disabled(model):  # the original weight, though merged
        torch.testing.assert_close(model(ids).logits, mixtral()(ids).logits, rtol=0, atol=1e-6)
    lorakit.unmerge(model)
    assert experts.gate_up_proj is original
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=0, atol=0)


def test_merge_and_unload_and_unload_leave_plain_experts() -> None:
    model = lorakit.inject(mixtral(), _config())
    randomize_adapters(model, std=0.2)
    ids = _ids()
    adapted = model(ids).logits
    experts = model.get_submodule("model.layers.0.mlp.experts.base_layer.base_layer")
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, LoraParameter) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    lorakit.unload(model)
    assert model.get_submodule("model.layers.0.mlp.experts") is experts
    torch.testing.assert_close(model(ids).logits, mixtral()(ids).logits, rtol=0, atol=0)


def test_saved_adapter_has_peft_keys_and_peft_loads_it_with_equal_outputs(tmp_path) -> None:
    model = lorakit.inject(mixtral(), _config())
    randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path)
    reference = _peft_model(mixtral())
    _copy_factors_into_peft(model, reference)
    peft_dir = tmp_path / "peft"
    reference.save_pretrained(peft_dir)
    ours, theirs = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(peft_dir / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS and config["target_modules"] == []
    loaded = peft.PeftModel.from_pretrained(mixtral(), tmp_path)
    ids = _ids()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_peft_saved_adapter_loads_into_lorakit_with_equal_outputs(tmp_path) -> None:
    reference = _peft_model(mixtral(), init_lora_weights=False)
    reference.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        model = lorakit.load_adapter(mixtral(), tmp_path)
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert len([1 for _, layer in lora_layers(model) if isinstance(layer, LoraParameter)]) == 4


def test_lorakit_round_trip_checks_the_base_fingerprint(tmp_path) -> None:
    model = lorakit.inject(mixtral(), _config())
    randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path)
    ids = _ids()
    loaded = lorakit.load_adapter(mixtral(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(lorakit.BaseModelMismatchError, match="experts"):
        lorakit.load_adapter(mixtral(seed=5), tmp_path)


def test_inspect_shows_the_adapted_parameters(tmp_path, capsys) -> None:
    from lorakit import cli

    model = lorakit.inject(mixtral(), _config())
    lorakit.save_adapter(model, tmp_path)
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_parameters"] == EXPERTS
    assert summary["adapted_parameters"] == 4
    assert summary["ranks"] == {"2": 4}  # per expert, not the E r rows of the file
    assert cli.main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert 'target parameters: ["experts.gate_up_proj", "experts.down_proj"] (4)' in text


def test_an_entry_that_matches_no_parameter_is_named() -> None:
    config = lorakit.LoraConfig(target_parameters=["experts.gate_proj"])
    with pytest.raises(TargetModulesError, match=r"experts\.gate_proj"):
        lorakit.inject(mixtral(), config)


def test_a_parameter_that_is_not_2d_or_3d_is_named() -> None:
    config = lorakit.LoraConfig(target_parameters=["input_layernorm.weight"])
    with pytest.raises(TargetModulesError, match=r"layers\.0\.input_layernorm\.weight.*1-D"):
        lorakit.inject(mixtral(), config)


@pytest.mark.parametrize(
    "changes",
    [{"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}, {"init_lora_weights": "eva"}],
)
def test_settings_peft_refuses_with_parameters_are_refused(changes) -> None:
    field_name = next(iter(changes))
    with pytest.raises(ValueError, match=f"{field_name}.*target_parameters"):
        _config(**changes)


def test_combine_serving_and_gguf_export_refuse_parameter_adapters(tmp_path) -> None:
    from lorakit.errors import AdapterFileError, UserError
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.serve.checks import lora_pairs

    model = lorakit.inject(mixtral(), _config())
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(UserError, match="target_parameters"):
        lorakit.combine(["default", str(tmp_path)], model=model)
    with pytest.raises(UserError, match="target_parameters"):
        lorakit.combine([str(tmp_path), str(tmp_path)])
    with pytest.raises(AdapterFileError, match="target_parameters"):
        lora_pairs("moe", _config(), load_file(tmp_path / "adapter_model.safetensors"), {}, 8)
    with pytest.raises(UserError, match="target_parameters"):
        export_adapter(tmp_path, mixtral(), tmp_path / "out.gguf")


def test_modules_and_parameters_together_equal_peft() -> None:
    base = mixtral()
    changes = dict(target_modules=["q_proj"])
    model = lorakit.inject(copy.deepcopy(base), _config(**changes))
    randomize_adapters(model, std=0.2)
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS),
    )
    _copy_factors_into_peft(model, reference)
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_two_adapters_share_the_layers_and_add_up() -> None:
    model = lorakit.inject(mixtral(), _config())
    lorakit.inject(model, _config(r=4), "second", activate=False)
    randomize_adapters(model, std=0.2)
    ids = _ids()
    outputs = {}
    for names in (["default"], ["second"], ["default", "second"]):
        with lorakit.use_adapters(model, names):
            outputs[tuple(names)] = model(ids).logits
    assert (outputs[("default",)] - outputs[("second",)]).abs().max() > 1e-2
    layer = model.get_submodule("model.layers.0.mlp.experts")
    assert tuple(layer.lora_A["second"].weight.shape) == (4 * 4, 48)
    lorakit.merge(model, ["default", "second"])  # both deltas in the weight
    with lorakit.use_adapters(model, ["default", "second"]):
        merged = model(ids).logits
    lorakit.unmerge(model)
    torch.testing.assert_close(merged, outputs[("default", "second")], rtol=1e-5, atol=1e-5)
    with pytest.raises(TargetModulesError, match="same set"):
        lorakit.inject(model, lorakit.LoraConfig(target_parameters=["gate_up_proj"]), "third")


def test_the_peft_front_door_takes_target_parameters(tmp_path) -> None:
    from lorakit import PeftModel, get_peft_model

    wrapped = get_peft_model(mixtral(), _config(init_lora_weights=False))
    wrapped.save_pretrained(tmp_path)
    ids = _ids()
    expected = wrapped(ids).logits
    loaded = PeftModel.from_pretrained(mixtral(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    plain = loaded.merge_and_unload()
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_spectra_refuse_parameter_adapters(tmp_path) -> None:
    from lorakit.analysis.sources import adapter_dir_spectra
    from lorakit.analysis.spectrum import adapter_spectra
    from lorakit.errors import UserError

    model = lorakit.inject(mixtral(), _config())
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(UserError, match="per expert"):
        adapter_dir_spectra(tmp_path)
    with pytest.raises(UserError, match="per expert"):
        adapter_spectra(model)


def test_unset_target_modules_take_the_default_first_as_in_peft() -> None:
    from lorakit.targets import find_targets

    only_parameters = lorakit.LoraConfig(target_parameters=EXPERTS)
    assert find_targets(mixtral(), only_parameters) == []  # no default for mixtral
    llama_model = tiny_llama()
    config = lorakit.LoraConfig(target_parameters=["mlp.down_proj.weight"])
    assert find_targets(llama_model, config)[:2] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    explicit = config.replace(target_modules=[])
    assert find_targets(llama_model, explicit) == []
    lorakit.inject(llama_model, explicit)  # a 2-D parameter of an nn.Linear, as PEFT allows
    assert isinstance(llama_model.get_submodule("model.layers.1.mlp.down_proj"), LoraParameter)


def test_a_2d_parameter_equals_peft() -> None:
    base = tiny_llama()
    names = ["mlp.down_proj.weight"]
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names)
    model = lorakit.inject(copy.deepcopy(base), config)
    randomize_adapters(model, std=0.2)
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names),
    )
    _copy_factors_into_peft(model, reference)
    ids = _ids()
    actual = model(ids).logits
    torch.testing.assert_close(actual, reference(ids).logits, rtol=0, atol=1e-5)
    assert (actual - base(ids).logits).abs().max() > 1e-3


def test_a_module_targeted_both_ways_is_refused_before_anything_is_wrapped() -> None:
    model = tiny_llama()
    modules_before = [(name, type(module)) for name, module in model.named_modules()]
    both = lorakit.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["v_proj.weight", "q_proj.weight"]
    )
    with pytest.raises(TargetModulesError, match=r"self_attn\.q_proj.*one way only"):
        lorakit.inject(model, both)
    assert [(name, type(module)) for name, module in model.named_modules()] == modules_before
    assert not list(lora_layers(model))
