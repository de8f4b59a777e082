"""A typo in one entry of a ``target_modules`` list is an error, not a silent drop (issue 12,
item 10): ``q_proj,v_prj`` used to adapt q_proj only. Every entry must match a module (PEFT's
list rule: the name, or a name ending in "." + entry); the error names the entries and the
closest module names. Regexes and "all-linear" are single patterns; adapter FILES keep loading
as peft loads them (entries without a module are accepted there)."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import TargetModulesError, UserError
from lorakit.state import lora_layers
from tests import tiny_models
from tests.cli_runs import run_cli


def _adapted_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in lora_layers(model)]


def test_inject_refuses_a_list_with_one_unmatched_entry_and_suggests_the_name():
    model = tiny_models.llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(TargetModulesError) as raised:
        lorakit.inject(model, LoraConfig(target_modules=["q_proj", "v_prj"]))
    message = str(raised.value)
    assert "'v_prj'" in message and "did you mean 'v_proj'" in message
    assert "'q_proj'" not in message.split("Adaptable")[0]  # only the unmatched entry is named
    assert isinstance(raised.value, UserError) and isinstance(raised.value, ValueError)
    assert _adapted_names(model) == [] and lorakit.adapter_configs(model) == {}
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_every_unmatched_entry_is_named_with_its_own_suggestion():
    with pytest.raises(TargetModulesError) as raised:
        lorakit.inject(
            tiny_models.llama(), LoraConfig(target_modules=["q_proj", "k_prj", "self_attn.o_prj"])
        )
    message = str(raised.value)
    assert "['k_prj', 'self_attn.o_prj']" in message
    assert "'k_prj': did you mean 'k_proj'" in message
    assert "'self_attn.o_prj': did you mean 'self_attn.o_proj'" in message


def test_peft_matching_rules_still_apply_to_list_entries():
    config = LoraConfig(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj"])
    model = lorakit.inject(tiny_models.llama(), config)  # a dotted suffix; a full name
    assert _adapted_names(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_a_regex_and_all_linear_are_single_patterns():
    model = lorakit.inject(tiny_models.llama(), LoraConfig(target_modules=r".*\.(q_proj|v_prj)"))
    assert _adapted_names(model) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    model = lorakit.inject(tiny_models.llama(), LoraConfig(target_modules="all-linear"))
    assert len(_adapted_names(model)) == 2 * 7


def test_nothing_matched_keeps_its_own_message():
    with pytest.raises(ValueError, match="matched no module of this LlamaForCausalLM"):
        lorakit.inject(tiny_models.llama(), LoraConfig(target_modules=["nosuch"]))


def test_get_peft_model_is_strict_too():
    with pytest.raises(TargetModulesError, match="'v_prj': did you mean 'v_proj'"):
        lorakit.get_peft_model(tiny_models.llama(), LoraConfig(target_modules=["q_proj", "v_prj"]))


def test_adapter_files_listing_absent_modules_still_load_like_peft(tmp_path):
    """A config written for a family with more module names (``c_attn`` is GPT-2's): peft loads
    it, and so does lorakit (the tensors decide what is loaded; they are checked exactly)."""
    model = lorakit.inject(tiny_models.llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["c_attn", "q_proj"]
    config_path.write_text(json.dumps(config))
    ids = tiny_models.input_ids()
    with pytest.warns(UserWarning):  # the JSON now differs from the copy in the weights file
        loaded = lorakit.load_adapter(tiny_models.llama(), tmp_path)
    assert _adapted_names(loaded) == _adapted_names(model)
    theirs = peft.PeftModel.from_pretrained(tiny_models.llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_serving_layers_for_the_union_of_adapter_targets_accept_absent_names():
    from lorakit.serve import prepare_for_serving

    model = tiny_models.llama()
    assert prepare_for_serving(model, ["c_attn", "q_proj"]) == 2


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A tiny Llama's config.json only: enough for ``plan`` and the checks before loading."""
    directory = tmp_path_factory.mktemp("tiny-llama-config")
    tiny_models.llama_config().save_pretrained(directory)
    return directory


def test_plan_refuses_a_typo_in_target_modules(capsys, config_dir):
    code, _, err = run_cli(capsys, "plan", config_dir, "--target-modules", "q_proj,v_prj")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "'v_prj': did you mean 'v_proj'" in err
    code, _, err = run_cli(capsys, "plan", config_dir, "--target-modules", "q_proj,v_proj")
    assert code == 0


def test_train_refuses_a_typo_in_target_modules_before_loading(
    tmp_path, capsys, monkeypatch, config_dir
):
    import lorakit.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(lorakit.models, "load_model", refuse)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        config_dir,
        "--data",
        data,
        "--target-modules",
        "q_proj,v_prj",
        "--output",
        tmp_path / "o",
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "'v_prj': did you mean 'v_proj'" in err
    assert not (tmp_path / "o").exists()
