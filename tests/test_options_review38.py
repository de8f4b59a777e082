"""Review 38 (LoraConfig's less common options against peft 0.22; the real ``peft`` is the
oracle):

1. a PEFT file with ``target_parameters`` and ``layers_to_transform`` / ``exclude_modules``
   (which PEFT applies to ``target_modules`` only: the parameter is adapted in every layer)
   loads, and computes PEFT's outputs; ``inject`` still refuses such a config (documented);
2. a refused field of feature settings set to ``{}`` is the feature on (PEFT fills in its
   defaults), so lorakit refuses it as any other value;
3. a file setting a refused field is refused in one sentence that points to PEFT;
4. docs: peft 0.22 mis-handles ``trainable_token_indices`` given as a tuple, lorakit does not;
5. docs: PEFT merges into a tied / replicated shared weight (merged != unmerged), lorakit copies
   first.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit
from lorakit.errors import AdapterFileError, TargetModulesError
from lorakit.io.config_json import config_from_json
from tests import tiny_models as tm

DOCS = Path(__file__).resolve().parent.parent / "docs"
IDS = tm.input_ids()
DOWN = ["mlp.experts.down_proj"]
SELECTIONS = [
    {"layers_to_transform": [1]},
    {"exclude_modules": ["model.layers.0.mlp.experts"]},
]
SETTINGS_FIELDS = [
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
]


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _randomize(model: torch.nn.Module, seed: int = 5) -> None:
    """Every trainable tensor random (B != 0), in either library."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _peft_file(make_model, directory: Path, **config) -> tuple[torch.Tensor, torch.nn.Module]:
    """A PEFT adapter with random tensors saved in ``directory``; (its logits, the PEFT model)."""
    model = _quiet(lambda: peft.get_peft_model(make_model(), peft.LoraConfig(**config)))
    _randomize(model)
    model.eval()
    _quiet(lambda: model.save_pretrained(directory))
    return _logits(model), model


def _adapted_parameters(model: torch.nn.Module) -> set[str]:
    """``<module path>`` of every expert block carrying LoRA (both libraries' names)."""
    names = {n for n, _ in model.named_parameters() if "lora_A" in n and "experts" in n}
    return {
        n.split("model.layers.", 1)[1].split(".lora_A")[0].replace(".base_layer", "") for n in names
    }


# ------------------------------------------------------------------ 1. target_parameters files


@pytest.mark.parametrize("selection", SELECTIONS, ids=["layers_to_transform", "exclude_modules"])
def test_a_peft_file_whose_selection_leaves_out_parameters_loads_as_peft_loads_it(
    tmp_path, selection
):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=DOWN)
    expected, theirs = _peft_file(tm.mixtral, tmp_path / "peft", **config, **selection)
    assert _adapted_parameters(theirs) == {"0.mlp.experts", "1.mlp.experts"}  # every layer

    ours = _quiet(lambda: lorakit.PeftModel.from_pretrained(tm.mixtral(), tmp_path / "peft"))
    ours.eval()
    assert (_logits(tm.mixtral()) - expected).abs().max() > 0.05  # the experts' LoRA counts
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5)
    assert _adapted_parameters(ours) == _adapted_parameters(theirs)

    ours.save_pretrained(tmp_path / "ours")  # the recorded config is a file's: saved as read
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: written[k] for k in selection} == selection
    again = _quiet(lambda: peft.PeftModel.from_pretrained(tm.mixtral(), tmp_path / "ours"))
    torch.testing.assert_close(_logits(again.eval()), expected, rtol=0, atol=1e-5)
    merged_theirs = _logits(_quiet(theirs.merge_and_unload))
    torch.testing.assert_close(_logits(ours.merge_and_unload()), merged_theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("selection", SELECTIONS, ids=["layers_to_transform", "exclude_modules"])
def test_inject_still_refuses_a_selection_that_would_leave_out_parameters(selection):
    """The documented choice (adapter-files.md, target_parameters): a written config that asks
    for what PEFT would ignore is refused, as an unmatched target_modules entry is."""
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=DOWN, **selection
    )
    with pytest.raises(TargetModulesError, match="leaves out"):
        lorakit.inject(tm.mixtral(), config)


# ------------------------------------------------------------------ 2. {} turns a feature on


@pytest.mark.parametrize("name", SETTINGS_FIELDS)
def test_an_empty_settings_dict_is_the_feature_on_and_refused(name):
    theirs = _quiet(lambda: getattr(peft.LoraConfig(**{name: {}}), name))
    assert type(theirs).__name__.endswith("Config")  # PEFT's settings, with their defaults
    with pytest.raises(ValueError, match=rf"^LoraConfig\.{name}=\{{\}} is a PEFT feature"):
        lorakit.LoraConfig(r=4, target_modules=["q_proj"], **{name: {}})
    text = json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], name: {}})
    with pytest.raises(AdapterFileError, match=rf"sets {name}=\{{\}}"):
        config_from_json(text, "adapter_config.json")


@pytest.mark.parametrize("name", ["kasa_config", "monteclora_config"])
def test_peft_turns_an_empty_dict_into_a_different_adapter(name):
    """The oracle behind item 2: PEFT's {} adds trainable tensors lorakit would not have."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    plain = _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**config)))
    on = _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**config, **{name: {}})))
    assert _trainable(on) > _trainable(plain)
    with pytest.raises(ValueError, match=name):
        lorakit.get_peft_model(tm.llama(), lorakit.LoraConfig(**config, **{name: {}}))


# ------------------------------------------------------------------ 3. the file's message


def test_a_peft_file_with_a_refused_feature_is_refused_in_one_sentence(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], kasa_config={})
    _peft_file(tm.llama, tmp_path, **config)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["kasa_config"]
    assert written  # PEFT wrote its filled-in defaults
    with pytest.raises(AdapterFileError) as caught:
        lorakit.PeftModel.from_pretrained(tm.llama(), tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'adapter_config.json'} sets kasa_config={written!r}, ")
    assert "lorakit cannot load" in message and "peft.PeftModel.from_pretrained" in message
    assert "leave it unset" not in message and " uses " not in message
    assert message.count(". ") == 0 and message.endswith(" instead.")


# ------------------------------------------------------------------ 4-5. what the docs say


def test_a_tuple_of_token_ids_works_in_lorakit_and_not_in_peft_022():
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=(4, 7))
    ours = lorakit.get_peft_model(tm.llama(), lorakit.LoraConfig(**config))
    listed = lorakit.get_peft_model(
        tm.llama(), lorakit.LoraConfig(**(config | {"trainable_token_indices": [4, 7]}))
    )
    assert ours.get_nb_trainable_parameters() == listed.get_nb_trainable_parameters()
    _logits(ours)
    theirs = _quiet(lambda: peft.get_peft_model(tm.llama(), peft.LoraConfig(**config)))
    if peft.__version__ == "0.22.0":
        trainable = theirs.get_nb_trainable_parameters()[0]
        assert trainable == ours.get_nb_trainable_parameters()[0] - 2 * 64 + 1  # one scalar
        with pytest.raises(IndexError):
            _logits(theirs)
    doc = " ".join((DOCS / "adapter-files.md").read_text().split())
    assert "or as a tuple, which lorakit takes and peft 0.22 does not" in doc


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tm.llama_config(tie_word_embeddings=True)).eval()


@pytest.mark.parametrize(
    ("make_model", "config"),
    [
        (_tied_llama, dict(target_modules=["embed_tokens", "q_proj"])),
        (tm.llama, dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])),
    ],
    ids=["tied_embedding", "layer_replication"],
)
def test_peft_merges_into_the_shared_weight_and_lorakit_copies_first(tmp_path, make_model, config):
    unmerged, theirs = _peft_file(make_model, tmp_path, r=4, lora_alpha=8, **config)
    assert (_logits(_quiet(theirs.merge_and_unload)) - unmerged).abs().max() > 0.05
    ours = _quiet(lambda: lorakit.PeftModel.from_pretrained(make_model(), tmp_path)).eval()
    torch.testing.assert_close(_logits(ours), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(ours.merge_and_unload()), unmerged, rtol=0, atol=1e-5)
    doc = " ".join((DOCS / "migrating-from-peft.md").read_text().split())
    assert "Merging into a shared weight gives the merged module a copy first" in doc
