"""Review fixes (round 30) of the low-rank analysis and the planner:

- ``lorakit extract --rank R`` with R above min(d, k) of a layer: the rank is capped to min(d, k)
  there, the cap is named in a warning, and the summary says the adapter has "N.Nx more"
  parameters than the dense update when it does (a rank-min(d, k) LoRA costs (d + k) r >= d k),
  "N.Nx fewer" only when it has fewer.
- ``lorakit plan``'s activations of a classifier count what its loss saves (the log-softmax of
  the (batch, num_labels) logits, the labels), equal to the byte to a real CPU step with labels.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

import lorakit
from lorakit.cli import main
from lorakit.plan import plan
from tests import tiny_models
from tests.saved_tensors import saved_bytes
from tests.tiny_models import fine_tuned

# ---- extract: a rank above min(d, k) ------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Llama and a fine-tune of it, saved: rank 2 / 4 / 3 updates of q_proj (64 x 64),
    v_proj (32 x 64) and down_proj (64 x 96) in each of its 2 layers, the only layers that
    change (6 in the adapter)."""
    base = tiny_models.llama()
    tuned = fine_tuned(base, noise=1e-5)
    root = tmp_path_factory.mktemp("models")
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _extract(capsys, model_dirs, output, rank: int, *extra: str) -> tuple[str, str]:
    base_dir, tuned_dir = model_dirs
    argv = ["extract", "--base", str(base_dir), "--finetuned", str(tuned_dir)]
    assert main([*argv, "--output", str(output), "--rank", str(rank), *extra]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _sizes(output) -> tuple[int, int, dict]:
    """``(adapter parameters, dense parameters d k summed, {layer: min(d, k)})`` of the saved
    adapter, from its tensors: A (r, k) and B (d, r)."""
    from safetensors.torch import load_file

    tensors = load_file(output / "adapter_model.safetensors")
    parameters = sum(t.numel() for t in tensors.values())
    dense, smallest = 0, {}
    for key, lora_A in tensors.items():
        if ".lora_A." in key:
            lora_B = tensors[key.replace(".lora_A.", ".lora_B.")]
            d, k = lora_B.shape[0], lora_A.shape[1]
            dense += d * k
            smallest[key.split("base_model.model.")[1].split(".lora_A.")[0]] = min(d, k)
    return parameters, dense, smallest


def test_extract_above_min_d_k_says_more_and_names_the_capped_layers(model_dirs, capsys, tmp_path):
    output = tmp_path / "adapter"
    out, err = _extract(capsys, model_dirs, output, 48)
    parameters, dense, smallest = _sizes(output)
    capped = sorted(name for name, limit in smallest.items() if limit < 48)
    assert len(smallest) == 6 and len(capped) == 2  # v_proj (32 x 64) of both layers
    assert parameters > dense
    assert f"{parameters / dense:.1f}x more than the dense update ({dense:,})" in out
    assert "fewer" not in out
    assert "warning" in err and "--rank 48" in err and "capped to min(d, k)" in err
    assert f"of {len(capped)} of {len(smallest)} layers" in err
    assert f"{capped[0]} (32)" in err
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["r"] == 48 and saved["rank_pattern"] == dict.fromkeys(capped, 32)


def test_extract_far_above_min_d_k_names_a_few_and_counts_the_rest(model_dirs, capsys, tmp_path):
    output = tmp_path / "adapter"
    out, err = _extract(capsys, model_dirs, output, 500)
    parameters, dense, smallest = _sizes(output)
    assert len(smallest) == 6
    assert f"{parameters / dense:.1f}x more than the dense update" in out
    assert "of 6 of 6 layers" in err and " and 2 more" in err
    assert "model.layers.0.self_attn.q_proj (64)" in err


def test_extract_capped_layers_are_in_the_json(model_dirs, capsys, tmp_path):
    out, err = _extract(capsys, model_dirs, tmp_path / "adapter", 48, "--json")
    report = json.loads(out)
    capped = [layer["name"] for layer in report["layers"] if layer["capped"]]
    assert report["capped_layers"] == capped and len(capped) == 2
    assert all(layer["rank"] == 32 for layer in report["layers"] if layer["capped"])
    assert all(layer["rank"] == 48 for layer in report["layers"] if not layer["capped"])
    assert "capped to min(d, k)" in err


def test_extract_below_min_d_k_says_fewer_and_warns_nothing(model_dirs, capsys, tmp_path):
    output = tmp_path / "adapter"
    out, err = _extract(capsys, model_dirs, output, 4)
    parameters, dense, _ = _sizes(output)
    assert parameters < dense
    assert f"{dense / parameters:.1f}x fewer than the dense update ({dense:,})" in out
    assert " more than the dense" not in out and err == ""


def test_extract_at_exactly_min_d_k_is_not_capped(model_dirs, capsys, tmp_path):
    out, err = _extract(capsys, model_dirs, tmp_path / "adapter", 32, "--json")
    report = json.loads(out)
    assert report["capped_layers"] == [] and err == ""
    assert {layer["rank"] for layer in report["layers"]} == {32}


# ---- plan: the activations of classifiers include their loss -------------------------------

BATCH, SEQ_LEN = 2, 16


def llama_classifier_config(**overrides):
    """The tiny Llama with 3 labels (and a pad token, which a batch above 1 needs)."""
    return tiny_models.llama_config(**{"pad_token_id": 0, "num_labels": 3, **overrides})


def bert_classifier_config(**overrides):
    """The tiny BERT with 3 labels and no dropout."""
    sizes = dict(tiny_models.BERT_SIZES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**sizes, "num_labels": 3, **overrides})


def _labels(kind: str, config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    if kind == "tokens":
        return torch.randint(0, config.num_labels, (BATCH, SEQ_LEN), generator=generator)
    if config.problem_type == "multi_label_classification":
        return torch.randint(0, 2, (BATCH, config.num_labels), generator=generator).float()
    if config.num_labels == 1:  # regression
        return torch.randn(BATCH, generator=generator)
    return torch.randint(0, config.num_labels, (BATCH,), generator=generator)


CASES = {  # (class, config, targets, dtype)
    "llama-seq-cls": (LlamaForSequenceClassification, llama_classifier_config, "all-linear"),
    "llama-seq-cls-bf16": (
        LlamaForSequenceClassification,
        llama_classifier_config,
        "all-linear",
        torch.bfloat16,  # the loss's log-softmax in bfloat16, as transformers computes it
    ),
    "llama-token-cls": (LlamaForTokenClassification, llama_classifier_config, ["q_proj", "v_proj"]),
    "bert-seq-cls": (BertForSequenceClassification, bert_classifier_config, ["query", "value"]),
    "bert-token-cls": (BertForTokenClassification, bert_classifier_config, ["query", "value"]),
    "bert-regression": (
        BertForSequenceClassification,
        lambda: bert_classifier_config(num_labels=1),
        ["query", "value"],
    ),
    "bert-multi-label": (
        BertForSequenceClassification,
        lambda: bert_classifier_config(problem_type="multi_label_classification"),
        ["query", "value"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_counts_what_a_classifier_step_saves_with_its_loss(case, tmp_path):
    """plan's activations == a real CPU step's saved tensors with labels: class ids (batch,)
    for a sequence classifier (float targets for regression and multi-label), (batch, seq_len)
    for a token classifier; before, the loss's tensors were left out."""
    model_class, make_config, targets, *rest = CASES[case]
    dtype = rest[0] if rest else torch.float32
    config = make_config()
    config.architectures = [model_class.__name__]
    config.save_pretrained(tmp_path)
    dtype_name = str(dtype).removeprefix("torch.")
    planned = plan(
        str(tmp_path),
        r=8,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        target_modules=targets,
        dtype=dtype_name,
    )
    assert planned.architecture == model_class.__name__ and planned.dtype == dtype_name
    assert planned.activations is not None, planned.activations_error

    torch.manual_seed(0)
    model = model_class(make_config()).to(dtype)
    # the task type plan assumes for the class (its head trained in full, as PEFT's task models)
    task = "SEQ_CLS" if model_class.__name__.endswith("SequenceClassification") else "TOKEN_CLS"
    lorakit.inject(
        model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task)
    )
    ids = torch.randint(1, 128, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    labels = _labels("tokens" if task == "TOKEN_CLS" else "sequences", model.config)
    if labels.is_floating_point():  # (regression and multi-label targets in the logits' dtype)
        labels = labels.to(dtype)
    assert planned.activations.saved_bytes == saved_bytes(model, input_ids=ids, labels=labels)
