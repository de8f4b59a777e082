"""Fixes for LoRA on Mixture-of-Experts models (``target_parameters`` / ``LoraParameter``):
``modules_to_save`` on a parameter target's module, ``inspect`` on entries without a module
part, ``plan``'s module-type table, ``lorakit train``'s dropout, the GGUF adapter export's
advice. Values are checked against the tensors of a tiny Mixtral and against peft."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import lorakit
from lorakit import cli
from lorakit.errors import TargetModulesError, UserError
from lorakit.io.summary import summarize_adapter
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.parameter import LoraParameter
from lorakit.plan import plan
from lorakit.state import lora_layers
from tests import tiny_tokenizer
from tests.cli_runs import train_cli
from tests.tiny_models import MOE_SIZES, mixtral, randomize_adapters

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _config(**overrides) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**({"r": 2, "lora_alpha": 4, "target_modules": []} | overrides))


# 1. modules_to_save on the module of a targeted parameter ------------------------------------


@pytest.mark.parametrize(
    ("saved", "parameters", "module", "parameter"),
    [
        (["gate"], ["gate.weight"], "model.layers.0.mlp.gate", "model.layers.0.mlp.gate.weight"),
        (
            ["experts"],
            EXPERTS,
            "model.layers.0.mlp.experts",
            "model.layers.0.mlp.experts.down_proj",
        ),
        (["mlp"], ["down_proj"], "model.layers.0.mlp", "model.layers.0.mlp.experts.down_proj"),
    ],
)
def test_modules_to_save_on_a_parameter_targets_module_is_refused(
    saved, parameters, module, parameter
):
    model = mixtral()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    config = _config(target_parameters=parameters, modules_to_save=saved)
    with pytest.raises(TargetModulesError) as caught:
        lorakit.inject(model, config)
    message = str(caught.value)
    assert f"module {module!r} is in modules_to_save" in message
    assert f"parameter {parameter!r}, which target_parameters adapts" in message
    assert "Drop it from modules_to_save or drop the parameter from target_parameters" in message
    assert [type(m) for m in model.modules()] == kinds  # nothing wrapped
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_peft_refuses_the_same_modules_to_save():
    config = peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["gate.weight"], modules_to_save=["gate"]
    )
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        peft.get_peft_model(mixtral(), config)


def test_modules_to_save_across_adapters_is_refused():
    """An earlier adapter's parameter layers (or whole copies) count as well."""
    model = lorakit.inject(mixtral(), _config(target_parameters=EXPERTS))
    with pytest.raises(TargetModulesError, match=r"'model\.layers\.0\.mlp\.experts' is in modules"):
        lorakit.inject(
            model, _config(target_modules=["q_proj"], modules_to_save=["experts"]), "second"
        )
    model = lorakit.inject(
        mixtral(), _config(target_modules=["q_proj"], modules_to_save=["experts"])
    )
    with pytest.raises(TargetModulesError, match="owns parameter"):
        lorakit.inject(model, _config(target_parameters=EXPERTS), "second")
    assert not any(isinstance(m, LoraParameter) for m in model.modules())


def test_modules_to_save_elsewhere_still_works():
    model = lorakit.inject(mixtral(), _config(target_parameters=EXPERTS, modules_to_save=["gate"]))
    assert isinstance(model.get_submodule("model.layers.0.mlp.gate"), ModulesToSave)


# 2. inspect: entries without a module part ----------------------------------------------------


def _true_numbers(model, rank_of) -> dict:
    """Ranks, base and LoRA parameter counts of the model's parameter layers, from the
    parameters themselves: a (E, d, k) tensor at rank r has E d k base and E r (d + k) LoRA
    parameters."""
    ranks, base, lora = {}, 0, 0
    for path, layer in lora_layers(model):
        assert isinstance(layer, LoraParameter)
        parameter = layer.parameter_path(path)
        experts, rows, columns = layer.live_weight().shape
        rank = rank_of(parameter)
        ranks[str(rank)] = ranks.get(str(rank), 0) + 1
        base += experts * rows * columns
        lora += experts * rank * (rows + columns)
    return {"ranks": ranks, "base": base, "lora": lora}


@pytest.mark.parametrize("parameters", [["gate_up_proj", "down_proj"], EXPERTS])
def test_inspect_counts_parameter_layers(tmp_path, parameters):
    config = _config(target_parameters=parameters, rank_pattern={"down_proj": 3})
    model = lorakit.inject(mixtral(), config)
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    summary = summarize_adapter(tmp_path)
    truth = _true_numbers(model, lambda p: 3 if p.endswith("down_proj") else 2)
    assert truth["ranks"] == {"2": 2, "3": 2}
    assert summary["adapted_parameters"] == 4 and summary["adapted_modules"] == 0
    assert summary["module_types"] == []
    assert summary["ranks"] == truth["ranks"]
    assert summary["scalings"] == {"1.33333": 2, "2": 2}  # alpha 4 / r
    assert summary["adapted_base_parameters"] == truth["base"]
    assert summary["lora_parameters"] == truth["lora"]
    assert summary["compression_ratio"] == pytest.approx(truth["base"] / truth["lora"])
    peft_config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=[],
        target_parameters=parameters,
        rank_pattern={"down_proj": 3},
    )
    peft_model = peft.get_peft_model(mixtral(), peft_config)
    assert summary["lora_parameters"] == peft_model.get_nb_trainable_parameters()[0]


def test_inspect_keeps_target_modules_layers_as_modules(tmp_path):
    """A converted all-linear config: modules by name beside bare entries."""
    model = lorakit.inject(mixtral(), _config(target_modules="all-linear"))
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "down_proj" in saved["target_parameters"]  # an entry without a module part
    summary = summarize_adapter(tmp_path)
    modules = [n for n, layer in lora_layers(model) if not isinstance(layer, LoraParameter)]
    parameters = [n for n, layer in lora_layers(model) if isinstance(layer, LoraParameter)]
    assert summary["adapted_modules"] == len(modules) == 8
    assert summary["adapted_parameters"] == len(parameters) == 6
    assert summary["module_types"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    lora_total = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert summary["lora_parameters"] == lora_total
    base = sum(layer.live_weight().numel() for n, layer in lora_layers(model) if n in parameters)
    base += sum(model.get_submodule(n).base_layer.weight.numel() for n in modules)
    assert summary["adapted_base_parameters"] == base


# 3. plan's module-type table ----------------------------------------------------------------


def test_plan_groups_parameter_layers_by_parameter(tmp_path):
    MixtralConfig(**MOE_SIZES).save_pretrained(tmp_path)
    result = plan(str(tmp_path), r=2)
    groups = {group.name: group for group in result.module_types}
    assert "experts" not in groups and "base_layer" not in groups
    model = lorakit.inject(mixtral(), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    for name, ending in [
        ("down_proj", "experts.down_proj"),
        ("gate_up_proj", "experts.gate_up_proj"),
        ("gate.weight", "mlp.gate.weight"),
    ]:
        tensors = [p for n, p in mixtral().named_parameters() if n.endswith(ending)]
        layers = [
            layer
            for path, layer in lora_layers(model)
            if isinstance(layer, LoraParameter) and layer.parameter_path(path).endswith(ending)
        ]
        lora = sum(p.numel() for layer in layers for p in layer.adapter_parameters("default"))
        assert groups[name].modules == len(tensors) == 2
        assert groups[name].base_parameters == sum(t.numel() for t in tensors)
        assert groups[name].lora_parameters == lora
    assert groups["down_proj"].base_parameters == 24_576
    assert groups["gate_up_proj"].base_parameters == 49_152
    assert groups["q_proj"].base_parameters == 2 * 64 * 64


# 4. lorakit train's dropout on a fused-MoE model ---------------------------------------------


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-mixtral")
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    sizes = MOE_SIZES | {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    MixtralForCausalLM(MixtralConfig(**sizes)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_train_defaults_use_no_dropout_on_parameter_targets(tmp_path, capsys, mixtral_dir, jsonl):
    output = tmp_path / "run"
    code = train_cli(mixtral_dir, jsonl, output, "--steps", "1", "--batch-size", "2", "--r", "2")
    err = capsys.readouterr().err
    assert code == 0, err
    notes = [line for line in err.splitlines() if "--dropout 0" in line]
    assert len(notes) == 1 and notes[0].startswith("lorakit: note: training with --dropout 0")
    assert "down_proj" in notes[0] and "gate_up_proj" in notes[0]
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0 and "down_proj" in config["target_parameters"]
    assert json.loads((output / "train_settings.json").read_text())["dropout"] == 0.0


@pytest.mark.parametrize("from_file", [False, True])
def test_train_explicit_dropout_on_parameter_targets_says_dropout_0(
    tmp_path, capsys, mixtral_dir, jsonl, from_file
):
    settings = ["--steps", "1", "--r", "2"]
    if from_file:
        (tmp_path / "run.yaml").write_text("dropout: 0.05\n")
        settings += ["--config", str(tmp_path / "run.yaml")]
    else:
        settings += ["--dropout", "0.1"]
    code = train_cli(mixtral_dir, jsonl, tmp_path / "run", *settings)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lorakit: error: --dropout ")
    assert err.rstrip().endswith("pass --dropout 0")
    assert not (tmp_path / "run").exists()


def test_train_dropout_default_kept_without_parameter_targets(model_dir):
    from lorakit.train.config_file import merged_values
    from lorakit.train.parameter_dropout import dropout_for_model

    values = merged_values(None, {"model": str(model_dir), "data": "x.jsonl"})
    assert dropout_for_model(values, given=False)["dropout"] == 0.05


# 5. GGUF adapter export's advice --------------------------------------------------------------


def test_gguf_adapter_export_of_moe_adapter_gives_a_working_route(tmp_path, capsys, mixtral_dir):
    from lorakit.export.gguf_adapter import export_adapter

    base = MixtralForCausalLM.from_pretrained(mixtral_dir)
    model = lorakit.inject(copy.deepcopy(base), _config(target_parameters=EXPERTS))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(UserError) as caught:
        export_adapter(tmp_path / "adapter", base, tmp_path / "a.gguf")
    message = str(caught.value)
    assert "Merge it into a full GGUF model instead" not in message
    assert "model_type='mixtral'" in message
    assert "lorakit merge --model MODEL" in message and "convert_hf_to_gguf.py" in message
    export_model = ["export", str(mixtral_dir), "--format", "gguf", "--output"]
    assert cli.main([*export_model, str(tmp_path / "m.gguf")]) == 2  # the old advice
    assert "model_type='mixtral'" in capsys.readouterr().err
    merged = tmp_path / "merged"
    command = ["merge", "--model", str(mixtral_dir), "--adapter", str(tmp_path / "adapter")]
    assert cli.main([*command, "--output", str(merged)]) == 0
    reloaded = MixtralForCausalLM.from_pretrained(merged)
    assert not any(isinstance(m, LoraLayer) for m in reloaded.modules())
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
