"""MoE review fixes (round 33), against peft 0.21 as the oracle: ``"all-linear"`` with
``exclude_modules`` honours the exclusion of the router on a fused-MoE model; a
transformers-4 DeepSeek-V3 file whose dense / shared MLP tensors lost their targets to the
conversion is refused naming the conversion, and the fix it names loads it as trained; a
file's ``target_parameters`` needs one matching entry, not all; rsLoRA on a fused pair warns
(``FusedMoeRsLoraWarning``) with PEFT's scaling kept."""

from __future__ import annotations

import copy
import json
import math
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import lorakit
from lorakit.errors import AdapterFileError, TargetModulesError
from lorakit.layers.parameter import LoraParameter
from lorakit.moe_targets import FusedMoeRsLoraWarning
from tests import tiny_models
from tests.peft_versions import peft_converts_moe_targets_by_path

IDS = tiny_models.input_ids(batch=2, length=7)
R, ALPHA = 2, 4
HIDDEN, DENSE, MOE = 64, 96, 48  # hidden size, dense MLP width, expert / shared expert width


def _peft(base, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))


def _peft_load(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)


def _copy_factors(model, theirs) -> None:
    """lorakit's LoRA tensors into PEFT's model of the same adapter (PEFT's keys: lorakit's
    with ``base_model.model.`` in front); every one must land."""
    ours = {f"base_model.model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
    result = theirs.load_state_dict(ours, strict=False)
    assert not result.unexpected_keys


def _adapted(model, prefix: str = "") -> set[str]:
    """The paths of the LoRA layers (their lora_A), ``prefix`` and ``.base_layer`` nesting
    kept (a module with two targeted parameters shows twice)."""
    return {
        name.split(".lora_A")[0].removeprefix(prefix)
        for name, _ in model.named_parameters()
        if ".lora_A" in name
    }


# ------------------------------------- 1. "all-linear" + exclude_modules: the router stays out
@pytest.mark.parametrize("exclude", [["gate"], r".*\.gate"], ids=["list", "regex"])
def test_all_linear_with_exclude_modules_leaves_the_router_unadapted(exclude):
    """Before: ``TargetModulesError`` "target_parameters matches '...mlp.gate.weight', which
    exclude_modules leaves out" (the all-linear conversion added ``gate`` regardless). Now the
    router is left out as asked; everything else is what PEFT adapts (PEFT 0.21 adapts the
    router too) and computes the same with the same factors."""
    base = tiny_models.mixtral()
    settings = dict(r=R, lora_alpha=ALPHA, target_modules="all-linear", exclude_modules=exclude)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**settings))
    config = lorakit.adapter_configs(model)["default"]
    assert sorted(config.target_parameters) == ["down_proj", "gate_up_proj"]
    assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    for layer in range(2):
        router = model.get_submodule(f"model.layers.{layer}.mlp.gate")
        assert not isinstance(router, LoraParameter)
        assert not any("lora_" in name for name, _ in router.named_parameters())
    theirs = _peft(base, **settings)
    routers = {f"model.layers.{layer}.mlp.gate" for layer in range(2)}
    assert routers <= _adapted(theirs, "base_model.model.")  # PEFT adapts it anyway
    assert _adapted(model) == _adapted(theirs, "base_model.model.") - routers
    tiny_models.randomize_adapters(model, std=0.2)
    _copy_factors(model, theirs)  # PEFT's router keeps its B = 0: no update
    got = model(IDS).logits
    assert (got - base(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, theirs(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("exclude", [["w1", "w3", "w2"], ["experts"]], ids=["names", "module"])
def test_all_linear_excluding_the_experts_adapts_attention_and_router_only(exclude):
    """The experts left out, by their transformers-4 names or by the module holding the fused
    parameters: no fused parameter is adapted (before: the names were adapted silently against
    the exclusion, the module refused as a target_parameters match the user never wrote)."""
    base = tiny_models.mixtral()
    model = lorakit.inject(
        copy.deepcopy(base),
        lorakit.LoraConfig(target_modules="all-linear", exclude_modules=exclude),
    )
    assert lorakit.adapter_configs(model)["default"].target_parameters == ["gate.weight"]
    assert {path.rsplit(".", 1)[-1] for path in _adapted(model)} == {
        "gate",
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    }


def test_all_linear_excluding_one_half_of_a_fused_pair_is_refused_naming_what_was_written():
    """``exclude_modules=["gate_proj"]`` on DeepSeek-V3 leaves out the experts' gate halves but
    not the up halves, fused in one parameter: refused (before: both adapted, silently)."""
    with pytest.raises(TargetModulesError) as caught:
        lorakit.inject(
            _deepseek_v3(),
            lorakit.LoraConfig(target_modules="all-linear", exclude_modules=["gate_proj"]),
        )
    message = str(caught.value)
    assert "target_modules='all-linear' with exclude_modules=['gate_proj'] stands for" in message
    assert "['up_proj'] but not ['gate_proj']" in message and "'gate_up_proj'" in message


# ------------------------------ 2. DeepSeek-V3: dense / shared MLPs and the transformers-4 file
def _deepseek_v3(seed: int = 0) -> DeepseekV3ForCausalLM:
    """A tiny DeepSeek-V3: layer 0 a dense MLP (``first_k_dense_replace=1``), layer 1 routed
    experts (fused) plus ``mlp.shared_experts``."""
    torch.manual_seed(seed)
    sizes = dict(tiny_models.DECODER_SIZES, intermediate_size=DENSE, num_hidden_layers=2)
    config = DeepseekV3Config(
        **sizes,
        moe_intermediate_size=MOE,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_shared_experts=1,
    )
    return DeepseekV3ForCausalLM(config).eval()


def _mlp_pairs(generator, tensors: dict, path: str, width: int) -> None:
    """Non-zero LoRA pairs for ``gate_proj`` / ``up_proj`` / ``down_proj`` of the MLP at
    ``path`` (inner width ``width``)."""
    shapes = {
        "gate_proj": (HIDDEN, width),
        "up_proj": (HIDDEN, width),
        "down_proj": (width, HIDDEN),
    }
    for name, (k, d) in shapes.items():
        key = f"base_model.model.{path}.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(R, k, generator=generator) * 0.2
        tensors[f"{key}.lora_B.weight"] = torch.randn(d, R, generator=generator) * 0.2


def _write_transformers4_file(directory, peft_version: str = "0.21.2") -> dict:
    """A transformers-4 era PEFT file of ``target_modules=[gate_proj, up_proj, down_proj]``:
    the dense MLP of layer 0, each routed expert and the shared experts of layer 1, written by
    PEFT ``peft_version`` (whose MoE conversion rule lorakit applies to it)."""
    generator, tensors = torch.Generator().manual_seed(0), {}
    _mlp_pairs(generator, tensors, "model.layers.0.mlp", DENSE)
    for e in range(4):
        _mlp_pairs(generator, tensors, f"model.layers.1.mlp.experts.{e}", MOE)
    _mlp_pairs(generator, tensors, "model.layers.1.mlp.shared_experts", MOE)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    names = ["down_proj", "gate_proj", "up_proj"]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=names).to_dict()
    config.update(target_modules=names, peft_type="LORA", task_type=None)
    config.update(peft_version=peft_version)
    (directory / "adapter_config.json").write_text(json.dumps(config, default=str))
    return tensors


def _reference(base, tensors: dict) -> torch.Tensor:
    """float64 logits of ``base`` with every pair's ``s B A`` (s = alpha / r) added to its own
    weight: the linear layers', and each expert's rows of the fused parameters."""
    ref = copy.deepcopy(base).double()
    ref.config._experts_implementation = "eager"
    replaced = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        delta = ALPHA / R * b @ a
        holder, _, name = path.rpartition(".")
        if ".experts." not in path:
            replaced[f"{path}.weight"] = ref.get_submodule(path).weight.detach() + delta
            continue
        experts, _, expert = holder.rpartition(".")
        fused = "down_proj" if name == "down_proj" else "gate_up_proj"
        current = replaced.get(f"{experts}.{fused}")
        if current is None:
            current = getattr(ref.get_submodule(experts), fused).detach().clone()
        rows = {"gate_proj": slice(0, MOE), "up_proj": slice(MOE, 2 * MOE)}.get(name, slice(None))
        current[int(expert), rows] += delta
        replaced[f"{experts}.{fused}"] = current
    return torch.func.functional_call(ref, replaced, (IDS,)).logits


def test_transformers4_deepseek_file_names_the_conversion_and_its_fix_loads_it(tmp_path):
    """Before: "has tensors that fit no module ... Is the model the adapter's base
    architecture?". Now the message of a file PEFT 0.21 wrote (whose rule lorakit applies to
    it) names the conversion, the layers and the target_parameters entries; with them the file
    loads as trained (float64 reference), as PEFT 0.21 loads the edited file (it drops the
    tensors of the unedited one silently). PEFT 0.22 keeps those layers as targets: it loads
    the unedited file as trained, and refuses the edited one (a layer targeted twice); a file
    PEFT 0.22 wrote loads unedited in lorakit (``tests/test_peft022_moe.py``)."""
    directory = tmp_path / "v4"
    tensors = _write_transformers4_file(directory)
    base = _deepseek_v3()
    with pytest.raises(AdapterFileError) as caught:
        lorakit.load_adapter(copy.deepcopy(base), directory)
    message = str(caught.value)
    assert "base architecture" not in message
    for part in (
        "convert_moe_config",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
        "['down_proj', 'gate_proj', 'up_proj']",  # the names moved
        "['down_proj', 'gate_up_proj']",  # where to
        "['down_proj.weight', 'gate_proj.weight', 'up_proj.weight']",  # the fix
        "transformers 4",
    ):
        assert part in message, part
    reference = _reference(base, tensors)
    unedited = _peft_load(base, directory)  # PEFT 0.21: the dense and shared tensors dropped
    dense = unedited.get_submodule("base_model.model.model.layers.0.mlp.gate_proj")
    assert isinstance(dense, torch.nn.Linear) != peft_converts_moe_targets_by_path()
    if peft_converts_moe_targets_by_path():  # PEFT 0.22's rule: as trained
        torch.testing.assert_close(unedited(IDS).logits.double(), reference, atol=1e-5, rtol=0)

    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_parameters"] = ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    model = lorakit.load_adapter(copy.deepcopy(base), directory)
    got = model(IDS).logits
    assert (reference - base(IDS).logits.double()).abs().max() > 1e-2
    torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)
    if peft_converts_moe_targets_by_path():
        with pytest.raises(ValueError, match="not a valid target"):
            _peft_load(base, directory)  # the layers both modules and parameters
        return
    torch.testing.assert_close(got, _peft_load(base, directory)(IDS).logits, atol=1e-5, rtol=0)
    assert (got - unedited(IDS).logits).abs().max() > 1e-3  # PEFT's unedited load differs


def test_a_file_with_only_foreign_tensors_keeps_the_architecture_message(tmp_path):
    """The conversion message is only for layers the conversion took: a tensor of no module
    of this model still gets the usual one."""
    directory = tmp_path / "v4"
    _write_transformers4_file(directory)
    file = directory / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors = {k: v for k, v in tensors.items() if ".experts." in k}  # only the routed experts
    tensors["base_model.model.model.layers.0.mlp.c_fc.lora_A.weight"] = torch.zeros(R, HIDDEN)
    tensors["base_model.model.model.layers.0.mlp.c_fc.lora_B.weight"] = torch.zeros(DENSE, R)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="base architecture") as caught:
        lorakit.load_adapter(_deepseek_v3(), directory)
    assert "convert_moe_config" not in str(caught.value)


def test_all_linear_on_deepseek_adapts_dense_and_shared_mlps_as_peft_022_and_the_docs_say():
    """docs/adapter-files.md: "all-linear" on DeepSeek-V3 adapts the dense MLP and the shared
    experts as linear layers beside the routed experts, as PEFT 0.22 does (PEFT 0.21 dropped
    them: ``peft_converts_moe_targets_by_path``; then the layers PEFT 0.22 adapts, written
    out, are the expectation); their weights also as target_parameters: refused, a layer
    targeted twice (PEFT 0.22 refuses it too)."""
    base = _deepseek_v3()
    mlps = {
        f"{holder}.{name}"
        for holder in ("model.layers.0.mlp", "model.layers.1.mlp.shared_experts")
        for name in ("gate_proj", "up_proj", "down_proj")
    }
    attention = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_proj"]
    expected = mlps | {f"model.layers.{i}.self_attn.{name}" for i in (0, 1) for name in attention}
    expected |= {f"model.layers.1.mlp.{name}" for name in ("experts", "experts.base_layer", "gate")}
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=R, target_modules="all-linear"))
    assert _adapted(ours) == expected
    weights = {"target_parameters": ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]}
    with pytest.raises(TargetModulesError, match="cannot also be in target_parameters"):
        lorakit.inject(
            copy.deepcopy(base), lorakit.LoraConfig(r=R, target_modules="all-linear", **weights)
        )
    if not peft_converts_moe_targets_by_path():
        return  # (PEFT 0.21 adapts neither the dense nor the shared MLPs)
    assert _adapted(_peft(base, r=R, target_modules="all-linear"), "base_model.model.") == expected
    with pytest.raises(ValueError, match="not a valid target"):
        _peft(base, r=R, target_modules="all-linear", **weights)


# ----------------------------- 3. a file's target_parameters: one entry must match, not all
def _fused_file(tmp_path, base, entries):
    theirs = _peft(
        base,
        r=R,
        lora_alpha=ALPHA,
        target_modules=[],
        target_parameters=["experts.gate_up_proj"],
        init_lora_weights=False,
    )
    directory = tmp_path / "fused"
    theirs.save_pretrained(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_parameters"] = entries
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return theirs, directory


def test_a_file_target_parameters_entry_matching_nothing_loads_as_peft_loads_it(tmp_path):
    """Before: ``AdapterFileError`` "entries ['experts.bogus'] match no parameter". Now the
    file loads, equal to PEFT's, the recorded config keeps the matching entry only, and the
    saved file loads again (lorakit and PEFT)."""
    base = tiny_models.mixtral()
    theirs, directory = _fused_file(tmp_path, base, ["experts.gate_up_proj", "experts.bogus"])
    expected = _peft_load(base, directory)(IDS).logits
    torch.testing.assert_close(expected, theirs(IDS).logits, atol=0, rtol=0)
    model = lorakit.load_adapter(copy.deepcopy(base), directory)
    got = model(IDS).logits
    assert (got - base(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert lorakit.adapter_configs(model)["default"].target_parameters == ["experts.gate_up_proj"]
    lorakit.save_adapter(model, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["experts.gate_up_proj"]
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(again(IDS).logits, got, atol=0, rtol=0)
    torch.testing.assert_close(
        _peft_load(base, tmp_path / "again")(IDS).logits, got, atol=1e-5, rtol=0
    )


def test_a_file_whose_target_parameters_match_nothing_is_still_refused(tmp_path):
    base = tiny_models.mixtral()
    _, directory = _fused_file(tmp_path, base, ["experts.bogus", "experts.other"])
    with pytest.raises(AdapterFileError, match=r"\['experts.bogus', 'experts.other'\] match no"):
        lorakit.load_adapter(copy.deepcopy(base), directory)
    with pytest.raises(TargetModulesError, match=r"\['experts.bogus'\] match no"):
        lorakit.inject(  # a config a person writes: every entry must match
            copy.deepcopy(base),
            lorakit.LoraConfig(
                target_modules=[], target_parameters=["gate_up_proj", "experts.bogus"]
            ),
        )


# ----------------------------------------- 4. rsLoRA on a fused pair: PEFT's value, one warning
def test_rslora_on_a_fused_pair_warns_once_and_keeps_peft_scaling(tmp_path):
    """Before: no word of it. The scaling is PEFT's (gate_up_proj: 2 alpha / sqrt(2 r) = 4.0,
    down_proj: alpha / sqrt(r)); inject warns once, naming the parameter and sqrt(2), at the
    caller's line; a load of the saved file does not warn."""
    base = tiny_models.mixtral()
    settings = dict(r=R, lora_alpha=ALPHA, target_modules=["w1", "w3", "w2"], use_rslora=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**settings))
    ours = [w for w in caught if issubclass(w.category, FusedMoeRsLoraWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert issubclass(FusedMoeRsLoraWarning, UserWarning)
    assert ours[0].filename == __file__
    text = str(ours[0].message)
    for part in ("'gate_up_proj'", "['w1', 'w3']", "sqrt(2) = 1.414", "2.828", "is 4,"):
        assert part in text, part
    theirs = _peft(base, **settings)
    for path, scaling in (
        ("model.layers.0.mlp.experts.base_layer", 2 * ALPHA / math.sqrt(2 * R)),
        ("model.layers.0.mlp.experts", ALPHA / math.sqrt(R)),
    ):
        assert model.get_submodule(path).scalings["default"] == pytest.approx(scaling)
        peft_layer = theirs.get_submodule(f"base_model.model.{path}")
        assert peft_layer.scaling["default"] == pytest.approx(scaling)
    lorakit.save_adapter(model, tmp_path / "rs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "rs")
    assert not [w for w in caught if issubclass(w.category, FusedMoeRsLoraWarning)]
    assert loaded.get_submodule("model.layers.0.mlp.experts.base_layer").scalings[
        "default"
    ] == pytest.approx(2 * ALPHA / math.sqrt(2 * R))


def test_no_rslora_warning_without_rslora_or_without_a_fused_pair():
    base = tiny_models.mixtral()
    for settings in (
        dict(target_modules=["w1", "w3", "w2"]),
        dict(target_modules=["w2", "q_proj"], use_rslora=True),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**settings))
        assert not [w for w in caught if issubclass(w.category, FusedMoeRsLoraWarning)]
