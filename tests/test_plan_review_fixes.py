"""Review fixes to ``plan``, ``count_parameters`` and ``analyze --base --finetuned``, each checked
against an independent oracle: the bytes a real model allocates, PEFT's own counts, the bytes a
real quantized model stores, and singular values computed here from the two models' weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, LlamaForCausalLM

import lorakit
from lorakit import quantized
from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.plan import plan
from lorakit.plan_report import format_report
from lorakit.quantized import int4_groups, int8_rows
from tests import tiny_models

QUANTIZERS = {"int8-rows": int8_rows, "int4-groups": int4_groups}


def _allocated_bytes(model: torch.nn.Module) -> int:
    """What ``model`` holds: its parameters and its quantized layers' storage, each once."""
    floats = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = [m for m in model.modules() if quantized.is_quantized(m)]
    return floats + sum(t.nbytes for m in layers for t in quantized.storage(m).values())


# 1. analyze --base --finetuned: a resized vocabulary's head is left out and named


@pytest.fixture
def resized_pair(tmp_path):
    """A base, its fine-tune with a known low-rank update and a vocabulary grown to 136."""
    base = tiny_models.llama()
    tuned = tiny_models.fine_tuned(base)
    tuned.resize_token_embeddings(136)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "ft")
    return base, tuned, tmp_path


def test_analyze_leaves_out_a_resized_head_and_says_which(resized_pair, capsys):
    base, tuned, directory = resized_pair
    capsys.readouterr()  # (the saving bars)
    argv = ["analyze", "--base", str(directory / "base"), "--finetuned", str(directory / "ft")]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["left_out"] == [
        {
            "name": "lm_head",
            "base_shape": [128, 64],
            "finetuned_shape": [136, 64],
            "reason": "shape 128x64 in the base, 136x64 in the fine-tuned model: no W_ft - W0",
        }
    ]
    # every other changed layer is analysed, with the singular values of W_ft - W0 computed here
    expected = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            delta = tuned.get_submodule(name).weight.double() - module.weight.double()
            if torch.any(delta):
                expected[name] = torch.linalg.svdvals(delta)
    assert [layer["name"] for layer in report["layers"]] == list(expected)
    for layer in report["layers"]:
        assert layer["singular_values"] == pytest.approx(expected[layer["name"]].tolist())
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "left out (another shape in the fine-tuned model" in text
    assert "  lm_head: shape 128x64 in the base, 136x64 in the fine-tuned model" in text


def test_analyze_still_refuses_when_no_layer_has_the_same_shape(tmp_path, capsys):
    tiny_models.llama().save_pretrained(tmp_path / "base")
    LlamaForCausalLM(tiny_models.llama_config(hidden_size=128)).save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    argv = ["analyze", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "wide")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "layer 'model.layers.0.self_attn.q_proj' has shape (64, 64) in the base" in err
    assert "they are not the same model" in err and err.count("\n") == 1


# 2. plan's base + N adapters: adapters kept in float32 on a float16 / bfloat16 base


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_base_plus_adapters_is_what_loaded_adapters_allocate(tmp_path, dtype):
    torch_dtype = getattr(torch, dtype)
    config = tiny_models.llama_config(architectures=["LlamaForCausalLM"], dtype=dtype)
    config.save_pretrained(tmp_path / "config")
    adapters = 3
    result = plan(str(tmp_path / "config"), r=8, target_modules="all-linear", num_adapters=adapters)
    source = lorakit.inject(
        tiny_models.llama(dtype=torch_dtype),
        lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    lorakit.save_adapter(source, tmp_path / "adapter")
    model = tiny_models.llama(dtype=torch_dtype)
    for index in range(adapters):
        model = lorakit.load_adapter(model, tmp_path / "adapter", adapter_name=f"a{index}")
    assert result.inference_with_adapters_bytes == _allocated_bytes(model)
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert adapter_dtypes == {torch.float32}
    assert result.adapter_dtype == "float32"
    assert "inference memory (weights only, adapters in float32)" in format_report(result)


# 3. count_parameters on the meta device: each quantized layer counted


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_count_parameters_of_a_quantized_meta_model_is_the_float_models(quantization):
    config = tiny_models.llama_config()
    float_count = lorakit.count_parameters(LlamaForCausalLM(config))
    assert float_count.total == sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert QUANTIZERS[quantization].quantize_linears(model) > 1
    on_cpu = LlamaForCausalLM(config)
    QUANTIZERS[quantization].quantize_linears(on_cpu)
    assert lorakit.count_parameters(model) == lorakit.count_parameters(on_cpu)
    assert lorakit.count_parameters(model).total == float_count.total


# 4. plan on a sequence classifier: PEFT's SEQ_CLS task (the head trained in full)


@pytest.mark.parametrize(
    ("targets", "counts"),
    [("all-linear", (7_363, 111_622)), (["query", "value"], (2_243, 106_502))],
)
def test_plan_of_a_sequence_classifier_counts_as_peft_seq_cls(tmp_path, targets, counts):
    import peft

    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=128,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )
    config.save_pretrained(tmp_path)
    result = plan(str(tmp_path), r=4, lora_alpha=8, target_modules=targets)
    reference = peft.get_peft_model(
        BertForSequenceClassification(config),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"),
    )
    expected = reference.get_nb_trainable_parameters()
    assert (result.trainable_parameters, result.total_parameters) == expected == counts
    assert result.config.task_type == "SEQ_CLS"
    assert "classifier" not in {group.name for group in result.module_types}  # no LoRA on it
    assert "task_type='SEQ_CLS'" in format_report(result)


# 5. plan --quantization int8-rows / int4-groups on GPT-2: loading refuses it (its Conv1D blocks
# store nothing quantized, only the tied head's int8 copy would be), and so does the plan since
# session 31 (tests/test_plan_quantized.py::test_plan_refuses_what_loading_refuses)


def test_a_cpu_format_on_a_model_without_a_linear_layer_says_why(tmp_path):
    config = GPT2Config(**tiny_models.GPT2_SIZES, architectures=["GPT2Model"])
    config.save_pretrained(tmp_path)  # Conv1D projections, no output layer
    with pytest.raises(UserError, match=r"take nn\.Linear layers only, not GPT-2's Conv1D"):
        plan(str(tmp_path), quantization="int8-rows")


@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_a_classifiers_weight_only_base_is_what_loading_stores(tmp_path, quantization):
    """Loading quantizes a classifier's body only (its new head stays float,
    ``loading.weight_only_part``): the plan's base is that model's bytes."""
    from transformers import LlamaForSequenceClassification

    from lorakit.quantized.loading import quantize_loaded

    config = tiny_models.llama_config(num_labels=2)
    config.architectures = ["LlamaForSequenceClassification"]
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    result = plan(str(tmp_path), quantization=quantization, r=4)
    model = LlamaForSequenceClassification(config)
    quantize_loaded(model, quantization, None)  # what load_model(quantization=...) runs
    assert type(model.score) is torch.nn.Linear
    assert result.base_bytes == _allocated_bytes(model)
