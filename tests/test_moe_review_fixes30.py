"""Review fixes (round 30) of the MoE targets and the PEFT front door, against peft 0.21 as the
oracle: a regex ``target_modules`` on a fused-MoE model adapts what PEFT's adapts and its
errors name the regex; the mixed-batch (``adapter_names=``) refusals are ValueErrors as PEFT's
(and still TypeErrors); a mixed batch's rows equal each adapter's own run up to float32
rounding."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import lorakit
from lorakit.errors import AdapterNamesError, TargetModulesError
from tests import tiny_models
from tests.peft_pairs import copy_into_peft
from tests.peft_versions import peft_unwrappable_regex_target_message

IDS = tiny_models.input_ids(batch=2, length=9)


def _qwen3_moe() -> Qwen3MoeForCausalLM:
    """A tiny Qwen3-MoE (fused experts; PEFT converts its targets as Qwen2-MoE's)."""
    torch.manual_seed(0)
    sizes = dict(tiny_models.MOE_SIZES, moe_intermediate_size=48, num_experts=4)
    sizes.pop("num_local_experts")
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**sizes)).eval()


def _olmoe() -> OlmoeForCausalLM:
    """A tiny OLMoE (fused experts; converted as Qwen2-MoE's)."""
    torch.manual_seed(0)
    sizes = dict(tiny_models.MOE_SIZES, num_experts=4, eos_token_id=1, pad_token_id=0)
    sizes.pop("num_local_experts")
    return OlmoeForCausalLM(OlmoeConfig(**sizes)).eval()


BUILDERS = {"mixtral": tiny_models.mixtral, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe}


def _peft_model(base, config: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))


# ------------------------------------------------- a regex target_modules on a fused-MoE model
@pytest.mark.parametrize(
    ("family", "regex", "adapted"),
    [
        ("mixtral", r".*(q_proj|v_proj).*", ["q_proj", "v_proj"]),
        ("qwen3_moe", r".*attn.*proj.*", ["k_proj", "o_proj", "q_proj", "v_proj"]),
    ],
)
def test_a_regex_matching_parameters_too_adapts_what_peft_adapts(tmp_path, family, regex, adapted):
    """The regex also matches ``...q_proj.weight`` in full: PEFT lists its last name part,
    ``weight``, which names no module; lorakit adapts the same tensors (counts, names, logits
    with non-zero B) and records only the modules."""
    config = dict(r=2, lora_alpha=4, target_modules=regex)
    base = BUILDERS[family]()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    theirs = _peft_model(base, config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    layers = sorted(
        {n.split(".lora_")[0] for n, _ in ours.model.named_parameters() if "lora_A" in n}
    )
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == adapted
    tiny_models.randomize_adapters(ours.model, std=0.2)  # B != 0
    copy_into_peft(ours, theirs)
    with torch.no_grad():
        mine, reference = ours.eval()(IDS).logits, theirs.eval()(IDS).logits
        assert (mine - base(IDS).logits).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)
    assert ours.peft_config["default"].target_modules == adapted  # no 'weight' entry
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, mine, rtol=0, atol=1e-5)


@pytest.mark.parametrize("regex", [r".*gate\.weight", r".*\.weight"])
def test_a_regex_matching_only_parameters_is_named_in_the_no_match_error(regex):
    """PEFT: "Target modules {'weight'} not found"; lorakit names the regex the user wrote."""
    with pytest.raises(peft.tuners.tuners_utils.NoMatchingPeftModuleError):
        _peft_model(tiny_models.mixtral(), dict(r=2, target_modules=regex))
    with pytest.raises(ValueError, match="matched no module") as caught:
        lorakit.get_peft_model(tiny_models.mixtral(), lorakit.LoraConfig(r=2, target_modules=regex))
    assert f"target_modules={regex!r}" in str(caught.value)
    assert "'weight'" not in str(caught.value)


@pytest.mark.parametrize(
    ("family", "regex", "module", "kind", "holds_experts"),
    [
        ("olmoe", r".*mlp.*", "model.layers.0.mlp", "OlmoeSparseMoeBlock", True),
        ("mixtral", r".*self_attn.*", "model.layers.0.self_attn", "MixtralAttention", False),
        ("mixtral", r".*experts.*", "model.layers.0.mlp.experts", "MixtralExperts", True),
    ],
)
def test_a_regex_selecting_a_module_no_layer_wraps_is_refused_naming_the_regex(
    family, regex, module, kind, holds_experts
):
    """Refused as PEFT refuses it (its message: ``peft_unwrappable_regex_target_message``), the
    message naming the regex and the module, not the generated entries ('weight',
    'gate_up_proj')."""
    with pytest.raises(ValueError, match=peft_unwrappable_regex_target_message(holds_experts)):
        _peft_model(BUILDERS[family](), dict(r=2, target_modules=regex))
    with pytest.raises(TargetModulesError) as caught:
        lorakit.get_peft_model(BUILDERS[family](), lorakit.LoraConfig(r=2, target_modules=regex))
    message = str(caught.value)
    assert f"target_modules={regex!r} selects {module!r}, a {kind}" in message
    assert "'weight'" not in message and "match no module" not in message


# ------------------------------------------------------- adapter_names=: PEFT's ValueErrors
def _with_parameter_adapter(library):
    """``library``'s PeftModel of a tiny Mixtral: "default" on q_proj, "p" on an expert tensor
    (``target_parameters``), eval mode."""
    model = library.get_peft_model(
        tiny_models.mixtral(), library.LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.add_adapter(
        "p", library.LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"])
    )
    return model.eval()


@pytest.mark.parametrize("library", [peft, lorakit], ids=["peft", "lorakit"])
def test_a_parameter_adapter_in_a_mixed_batch_is_a_value_error(library):
    model = _with_parameter_adapter(library)
    with torch.no_grad(), pytest.raises(ValueError) as caught:
        model(IDS, adapter_names=["default", "p"])
    if library is lorakit:
        assert isinstance(caught.value, AdapterNamesError)
        assert isinstance(caught.value, TypeError)  # as lorakit raised before
        assert "'p'" in str(caught.value) and "use_adapters" in str(caught.value)


@pytest.mark.parametrize("library", [peft, lorakit], ids=["peft", "lorakit"])
def test_adapter_names_as_a_plain_string_is_a_value_error(library):
    model = library.get_peft_model(
        tiny_models.llama(), library.LoraConfig(r=2, target_modules=["q_proj"])
    ).eval()
    with torch.no_grad(), pytest.raises(ValueError) as caught:
        model(IDS, adapter_names="default")
    if library is lorakit:
        assert isinstance(caught.value, TypeError)  # as lorakit raised before
        assert "a list of str" in str(caught.value)


# ------------------------------------------- a mixed batch's rows: its adapters' own runs
@pytest.mark.parametrize("length", [6, 20])  # short rows: padded grids; 16 tokens or more: looped
def test_mixed_batch_rows_equal_each_adapter_alone_up_to_float32_rounding(length):
    """Row i of ``adapter_names=`` equals the whole batch run with adapter i alone, to within
    1e-6 (the batched matmuls of the routed path sum in another order than the single-adapter
    forward's matmul: float32 rounding, not a different formula). Scalings 5/3 and 1/2."""
    model = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"])
    )
    model.add_adapter(
        "b", lorakit.LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "o_proj"])
    )
    tiny_models.randomize_adapters(model.model, std=0.2)
    model.eval()
    ids = tiny_models.input_ids(batch=4, length=length)
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        alone = {}
        for name in ("default", "b", "__base__"):
            with lorakit.use_adapters(model.model, [] if name == "__base__" else [name]):
                alone[name] = model(ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=0, atol=1e-6)
    assert (alone["b"] - alone["default"]).abs().max() > 1e-2  # the rows were routed apart
