"""``lorakit plan --quantization nf4|fp4|int8`` counts exactly the layers a real bitsandbytes
load (lorakit's own ``from_pretrained`` options, ``lorakit.models._loading_options``) stores
quantized. transformers keeps in float the output layer, tied weights and the module owning the
model's LAST parameter: a Llama classifier's ``score`` head (last parameter ``score.weight``)
stays float, while BERT's classifier (last parameter ``classifier.bias``, naming no module) is
quantized. The plan counted the Llama classifier's head as quantized."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from lorakit import quantized
from lorakit.meta_model import build_meta_model
from lorakit.models import _loading_options
from lorakit.plan import plan
from lorakit.quantized.footprint import quantized_linears
from lorakit.quantized.loading import quantize_loaded
from tests import tiny_models

LABELS = 3
# (class, task, config, the layer transformers keeps float besides the output layer / None)
MODELS = {
    "llama-lm": (LlamaForCausalLM, "causal-lm", tiny_models.llama_config(), None),
    "llama-lm-tied": (
        LlamaForCausalLM,
        "causal-lm",
        tiny_models.llama_config(tie_word_embeddings=True),
        None,
    ),
    "llama-cls": (
        LlamaForSequenceClassification,
        "seq-cls",
        tiny_models.llama_config(num_labels=LABELS, pad_token_id=0),
        "score",
    ),
    "bert-cls": (
        BertForSequenceClassification,
        "seq-cls",
        BertConfig(**tiny_models.BERT_SIZES, num_labels=LABELS),
        None,
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each of ``MODELS`` saved to its own directory (random weights, seed 0)."""
    directories = {}
    for name, (model_class, _, config, _) in MODELS.items():
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(name)
        model_class(config).save_pretrained(directory)
        directories[name] = directory
    return directories


def _bitsandbytes_load(directory, model_class, task: str, quantization: str):
    """The model as ``lorakit.models.load_model`` loads it quantized (its ``from_pretrained``
    options, then ``quantize_loaded``)."""
    options = _loading_options(task, LABELS, quantization, torch.float32)
    options.pop("output_loading_info")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class.from_pretrained(directory, **options)
    quantize_loaded(model, quantization, None)
    return model


def _stored(layers) -> int:
    """Bytes the quantized layers store: codes and scales, and the double quantization's offset."""
    stored = sum(t.nbytes for m in layers for t in quantized.storage(m).values())
    states = [getattr(m.weight, "quant_state", None) for m in layers]
    return stored + sum(state.offset.nbytes for state in states if state is not None)


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_plan_counts_the_layers_a_bitsandbytes_load_stores_quantized(saved, name, quantization):
    model_class, task, _, kept_float = MODELS[name]
    loaded = _bitsandbytes_load(saved[name], model_class, task, quantization)
    real = {n: m for n, m in loaded.named_modules() if quantized.is_quantized(m)}
    weights, planned = plan(str(saved[name]), r=4, quantization=quantization).quantized_weights
    assert weights == sum(m.in_features * m.out_features for m in real.values())
    assert planned == _stored(list(real.values()))
    # the same layers by name, on the plan's meta model
    meta_model, _ = build_meta_model(str(saved[name]), "float32")
    assert [n for n, _ in quantized_linears(meta_model, quantization)] == list(real)
    if kept_float is not None:  # the head stays a float nn.Linear, and the plan leaves it out
        assert type(loaded.get_submodule(kept_float)) is torch.nn.Linear
        assert loaded.get_submodule(kept_float).weight.dtype == torch.float32
        assert kept_float not in real


def test_a_llama_classifier_s_head_is_float_and_a_bert_classifier_is_quantized(saved):
    """The numbers: the tiny Llama classifier's 14 block linears (2 x (64 x 64 q, o; 32 x 64 k,
    v; 96 x 64 gate, up; 64 x 96 down)) are quantized, its 3 x 64 ``score`` is not; BERT's
    3 x 64 classifier is, with the 12 block linears and the 64 x 64 pooler."""
    llama = plan(str(saved["llama-cls"]), r=4, quantization="nf4")
    block = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64
    assert llama.quantized_weights[0] == 2 * block == 61_440
    bert = plan(str(saved["bert-cls"]), r=4, quantization="nf4")
    bert_block = 4 * 64 * 64 + 2 * 96 * 64
    assert bert.quantized_weights[0] == 2 * bert_block + 64 * 64 + LABELS * 64 == 61_632
