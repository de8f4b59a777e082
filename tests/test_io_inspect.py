"""``lorakit inspect``: the numbers come from the header alone and match the model's."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import safetensors
import safetensors.torch

import lorakit
from lorakit.cli import main
from lorakit.io import save_adapter
from lorakit.io.summary import summarize_adapter
from tests import tiny_models
from tests.bad_adapters import write_header_only_file


@pytest.fixture
def llama_adapter(tmp_path):
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
    )
    model = lorakit.inject(tiny_models.llama(), config)
    tiny_models.randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _forbid_tensor_reads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("inspect must not read tensors")

    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(lorakit.io.tensors, "read_safetensors", refuse)  # lorakit's own reader
    monkeypatch.setattr(lorakit.io.read, "read_safetensors", refuse)


def test_json_summary_matches_the_model(llama_adapter, monkeypatch, capsys) -> None:
    model, directory = llama_adapter
    _forbid_tensor_reads(monkeypatch)
    assert main(["inspect", str(directory), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)

    layers = list(lorakit.state.lora_layers(model))
    base = sum(layer.out_features * layer.in_features for _, layer in layers)  # sum d*k
    lora = sum(
        layer.ranks["default"] * (layer.out_features + layer.in_features) for _, layer in layers
    )
    assert summary["adapted_modules"] == 14
    assert summary["ranks"] == {"2": 2, "4": 12}
    assert summary["alphas"] == {"3": 2, "8": 12}
    # rsLoRA: alpha / sqrt(r): q_proj 8/sqrt(2), v_proj 3/2, others 8/2
    assert summary["scalings"] == {"1.5": 2, "4": 10, f"{round(8 / 2**0.5, 6):g}": 2}
    assert summary["lora_parameters"] == lora == lorakit.count_parameters(model).trainable
    assert summary["parameters"] == lora and summary["other_parameters"] == 0
    assert summary["adapted_base_parameters"] == base
    assert summary["compression_ratio"] == pytest.approx(base / lora, rel=1e-12)
    assert summary["file_bytes"] == (directory / "adapter_model.safetensors").stat().st_size
    assert summary["dtypes"] == {"F32": 28}
    assert summary["fingerprint"] == {
        "present": True,
        "readable": True,
        "modules": 14,
        "base_dtypes": ["float32"],
    }
    assert summary["use_rslora"] is True and summary["task_type"] is None


def test_text_output_names_the_essentials(llama_adapter, capsys) -> None:
    _, directory = llama_adapter
    assert main(["inspect", str(directory)]) == 0
    text = capsys.readouterr().out
    for expected in (
        "fingerprint:     present (14 modules",
        "rank:            2 (2 modules), 4 (12 modules)",
        "(rsLoRA)",
        "F32 (28 tensors)",
        "compression:",
    ):
        assert expected in text, text


def test_peft_adapter_without_fingerprint_and_with_saved_head(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_models.bert(),
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query"], task_type="SEQ_CLS"),
        )
        theirs.save_pretrained(tmp_path)
    summary = summarize_adapter(tmp_path)
    assert summary["fingerprint"] == {"present": False}
    assert summary["ranks"] == {"8": 2} and summary["scalings"] == {"2": 2}
    assert summary["lora_parameters"] == 2 * 8 * (64 + 64)
    assert summary["other_parameters"] == 2 * 64 + 2  # classifier weight and bias, in full


def test_a_saved_head_with_nested_layers_counts_as_trained_not_as_base_weights(tmp_path) -> None:
    """RoBERTa's classifier holds dense and out_proj: PEFT's modules_to_save copies of them are
    trained parameters, not base embedding weights (they used to be counted as both)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            RobertaForSequenceClassification(config),
            peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
        )
        theirs.save_pretrained(tmp_path)
    trainable, _ = theirs.get_nb_trainable_parameters()
    summary = summarize_adapter(tmp_path)
    head = (32 * 32 + 32) + (3 * 32 + 3)  # classifier.dense and classifier.out_proj
    assert summary["saved_base_weights"] == 0
    assert summary["parameters"] == summary["file_parameters"] == trainable
    assert summary["other_parameters"] == head == trainable - 2 * 2 * 4 * (32 + 32)


def test_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (tmp_path / "adapter_model.bin").write_bytes(b"not opened")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_a_4_gib_adapter_is_summarised_from_its_header_alone(tmp_path, monkeypatch) -> None:
    """r=64 on a (2**24 x 8192) matrix: 4 GiB of factors that inspect must never read."""
    d, k, r = 2**24, 8192, 64
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    size = write_header_only_file(
        tmp_path / "adapter_model.safetensors",
        {f"{prefix}.lora_A.weight": (r, k), f"{prefix}.lora_B.weight": (d, r)},
        {"format": "pt"},
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 2 * r,
                "target_modules": ["down_proj"],
                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            }
        )
    )
    _forbid_tensor_reads(monkeypatch)
    summary = summarize_adapter(tmp_path)
    assert size > 4 * 2**30 and summary["file_bytes"] == size
    assert summary["lora_parameters"] == r * (d + k) == summary["parameters"]
    assert summary["compression_ratio"] == pytest.approx(d * k / (r * (d + k)), rel=1e-12)
    assert summary["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert summary["scalings"] == {"2": 1} and summary["fingerprint"] == {"present": False}


def test_text_output_names_the_base_model(tmp_path, capsys) -> None:
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path="my/base")
    save_adapter(lorakit.inject(tiny_models.llama(), config), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "my/base" in capsys.readouterr().out


def test_a_file_missing_one_factor_is_one_line_naming_the_module(tmp_path, capsys) -> None:
    write_header_only_file(
        tmp_path / "adapter_model.safetensors",
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 64)},
        {"format": "pt"},
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    assert main(["inspect", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no lora_B tensor for module 'model.layers.0.self_attn.q_proj'" in error
    assert "Traceback" not in error


def test_a_hand_edited_alpha_is_reported_as_load_adapter_uses_it(llama_adapter) -> None:
    """The config saved inside the weights file wins over an edited adapter_config.json (the
    numbers must fit the tensors): inspect showed the edited alpha and scaling, which
    load_adapter and analyze do not use."""
    _, directory = llama_adapter
    path = directory / "adapter_config.json"
    edited = json.loads(path.read_text()) | {"lora_alpha": 32}
    path.write_text(json.dumps(edited))
    with pytest.warns(UserWarning, match="using the config saved with the weights"):
        summary = summarize_adapter(directory)
    with pytest.warns(UserWarning):
        loaded = lorakit.io.read_adapter(directory).config
    assert loaded.lora_alpha == 8
    assert set(summary["alphas"]) == {"8", "3"}, summary["alphas"]


def test_a_named_adapter_is_read_from_its_subdirectory(tmp_path) -> None:
    """PEFT's layout: "default" at the top, "other" in DIR/other; --adapter-name other
    summarises "other" (it described "default" for a while)."""
    model = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.add_adapter("other", lorakit.LoraConfig(r=8, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    assert summarize_adapter(tmp_path)["ranks"] == {"2": 2}
    other = summarize_adapter(tmp_path, "other")
    assert other["ranks"] == {"8": 2} and other["target_modules"] == ["v_proj"]


def _peft_truth(model) -> dict:
    """Ranks, alphas, scalings, adapted base parameters and LoRA parameters of a peft model."""
    from collections import Counter

    ranks, alphas, scalings, base = Counter(), Counter(), Counter(), 0
    for _, module in model.named_modules():
        if not isinstance(getattr(module, "r", None), dict) or "default" not in module.r:
            continue
        layer = module.get_base_layer()
        name = getattr(module, "parameter_name", None)
        weight = getattr(layer, name) if name else layer.weight
        base += weight.numel()
        ranks[str(module.r["default"])] += 1
        alphas[f"{module.lora_alpha['default']:g}"] += 1
        scalings[f"{round(module.scaling['default'], 6):g}"] += 1
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {
        "ranks": dict(sorted(ranks.items())),
        "alphas": dict(sorted(alphas.items())),
        "scalings": dict(sorted(scalings.items())),
        "adapted_base_parameters": base,
        "lora_parameters": lora,
        "compression_ratio": base / lora,
    }


@pytest.mark.parametrize(
    "parameters, rank_pattern, alpha_pattern",
    [
        (["mlp.experts.down_proj"], {"down_proj": 8}, {}),
        (["mlp.experts.down_proj"], {"down_proj": 6}, {}),
        (["mlp.experts.down_proj"], {"down_proj": 8}, {"down_proj": 3}),
        (  # two parameters of one module (nested layers), each with its own rank and alpha
            ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            {"gate_up_proj": 8, "down_proj": 6},
            {"gate_up_proj": 2},
        ),
    ],
)
def test_expert_parameters_with_rank_and_alpha_patterns_match_peft(
    tmp_path, parameters, rank_pattern, alpha_pattern
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny_models.mixtral(),
            peft.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj"],
                target_parameters=parameters,
                rank_pattern=rank_pattern,
                alpha_pattern=alpha_pattern,
            ),
        )
        theirs.save_pretrained(tmp_path)
    truth = _peft_truth(theirs)
    summary = summarize_adapter(tmp_path)
    ratio = truth.pop("compression_ratio")
    assert {key: summary[key] for key in truth} == truth
    assert summary["compression_ratio"] == pytest.approx(ratio)
    assert summary["adapted_modules"] == 2  # the q_proj of both blocks
    assert summary["adapted_parameters"] == 2 * len(parameters)
