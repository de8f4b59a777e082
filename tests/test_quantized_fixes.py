"""Fixes in the quantized-base code: casting a model that holds lorakit's weight-only layers,
``merge_and_unload`` of a tied model whose output layer was quantized, bad GGUF paths, and the
lists of supported formats in error messages."""

from __future__ import annotations

import contextlib
import logging

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

import lorakit
from lorakit import quantized
from lorakit.errors import UserError
from lorakit.merge import merge_and_unload
from lorakit.quantized import UnsupportedQuantizedLayerError
from lorakit.quantized.gguf_file import replace_llama_linears
from lorakit.quantized.loading import QUANTIZATIONS, check_quantization, quantize_loaded
from tests import tiny_models

WEIGHT_ONLY = ("int8-rows", "int4-groups")
BF16_EPS = 2.0**-8  # bfloat16's relative rounding (8 significant bits)
CASTS = {
    "float": lambda model: model.float(),
    "half": lambda model: model.half(),
    "bfloat16": lambda model: model.bfloat16(),
    "to(float16)": lambda model: model.to(torch.float16),
}


def weight_only_llama(quantization: str, **config) -> LlamaForCausalLM:
    """The tiny Llama (float32) as ``load_model(..., quantization=...)`` leaves it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(**config)).eval()
    quantize_loaded(model, quantization, None)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits.double()


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's stored tensors (codes, scales), by module and tensor name."""
    return {
        f"{name}.{key}": tensor.clone()
        for name, module in model.named_modules()
        if quantized.is_quantized(module)
        for key, tensor in quantized.storage(module).items()
    }


# ------------------------------------------------------------------- 1. casting the model
@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("quantization", WEIGHT_ONLY)
def test_a_cast_model_keeps_its_weight_only_storage_and_runs(quantization, cast):
    model = weight_only_llama(quantization)
    expected = logits(model)
    stored = stored_tensors(model)
    CASTS[cast](model)
    after = stored_tensors(model)
    assert stored.keys() == after.keys() and stored
    for key, tensor in stored.items():  # bit for bit, in the dtype the kernel reads
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    got = logits(model)
    if cast == "float":  # the model was float32 already: nothing changes
        assert torch.equal(got, expected)
    else:  # the rest of the model now computes in 16 bits
        assert ((got - expected).norm() / expected.norm()).item() < 4 * BF16_EPS


@pytest.mark.parametrize("quantization", WEIGHT_ONLY)
def test_a_cast_with_a_device_moves_the_storage_and_keeps_its_dtype(quantization):
    model = weight_only_llama(quantization).to("meta", torch.float16)
    layer = model.model.layers[0].self_attn.q_proj
    for tensor in quantized.storage(layer).values():
        assert tensor.device.type == "meta"
        assert tensor.dtype in (torch.int8, torch.uint8, torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.float16


# --------------------------------------------------- 2. merge_and_unload of a tied model
@pytest.mark.parametrize("adapt_output_layer", [False, True])
@pytest.mark.parametrize("quantization", WEIGHT_ONLY)
def test_merging_a_tied_model_with_a_quantized_output_layer_unties_its_config(
    quantization, adapt_output_layer, tmp_path
):
    model = weight_only_llama(quantization, tie_word_embeddings=True)
    assert model.config.tie_word_embeddings and quantized.is_quantized(model.lm_head)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if adapt_output_layer else [])
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    tiny_models.randomize_adapters(model, std=0.1)
    unmerged = logits(model)
    merged = merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    in_memory = logits(merged)
    # the float merge differs from the kernels' output by their bfloat16 rounding only
    assert ((in_memory - unmerged).norm() / unmerged.norm()).item() < 2 * BF16_EPS
    merged.tie_weights()  # as transformers calls it: the head stays the merged one
    assert torch.equal(logits(merged), in_memory)
    merged.save_pretrained(tmp_path)
    with transformers_messages() as messages:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not [m for m in messages if "NOT tie" in m], messages
    assert torch.equal(logits(reloaded), in_memory)


@contextlib.contextmanager
def transformers_messages():
    """The warnings transformers logs inside the block (its loggers do not reach ``caplog``)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root = transformers_logging.get_logger()  # the library's root: every module's logger
    handler = Collect(logging.WARNING)
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)


def test_merging_an_untied_quantized_model_keeps_its_config_untied():
    model = weight_only_llama("int8-rows")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert merge_and_unload(model).config.tie_word_embeddings is False


# ------------------------------------------------------------------ 3. bad GGUF paths
def _valid_gguf(path) -> bytes:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"hello world, not gguf" * 10, "is not a GGUF file"),
        (b"", "is empty"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 5, "is truncated or corrupt"),
        ("cut", "is truncated or corrupt"),
        (None, "is a directory"),
        ("missing", "does not exist"),
    ],
    ids=["not-gguf", "empty", "truncated-header", "truncated-tensor", "directory", "missing"],
)
def test_a_bad_gguf_path_is_one_user_error_naming_it(tmp_path, content, problem):
    path = tmp_path / "model.gguf"
    if content == "cut":
        path.write_bytes(_valid_gguf(tmp_path / "whole.gguf")[:-100])
    elif content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(UserError) as refused:
        replace_llama_linears(tiny_models.llama(), path)
    message = str(refused.value)
    assert f"GGUF file '{path}' {problem}" in message
    assert "pass the path of a complete .gguf file" in message


# --------------------------------------------------- 4. supported formats in messages
class QLinear(nn.Linear):
    """Named like a quantized layer no backend runs (optimum-quanto's class name)."""


def test_the_unknown_quantized_layer_error_names_every_supported_format():
    with pytest.raises(UnsupportedQuantizedLayerError) as refused:
        quantized.check_supported(QLinear(4, 4), "proj")
    message = str(refused.value)
    for name in ("GGUFLinear", "int8-rows", "int4-groups", "bitsandbytes", "torchao"):
        assert name in message
    for _, _, label in quantized._DISPATCH:  # every backend, from the one list
        assert label in message


def test_gguf_without_a_gguf_file_offers_every_other_quantization():
    with pytest.raises(UserError, match="no GGUF file") as refused:
        check_quantization("gguf", None)
    others = [name for name in QUANTIZATIONS if name != "gguf"]
    assert "int4-groups" in others
    assert str(refused.value).endswith(f"Choose another: {', '.join(others)}")
