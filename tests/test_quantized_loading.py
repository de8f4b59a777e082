"""``lorakit.models.load_model(spec, quantization=...)``: a quantized frozen base by name
(bitsandbytes NF4 / FP4 / int8, or the GGUF blocks of the built-in SmolLM2 file)."""

from __future__ import annotations

import pytest
import torch

from lorakit import quantized
from lorakit.errors import UserError
from lorakit.models import load_model
from lorakit.quantized.gguf_blocks import GGUFLinear
from tests import tiny_models


@pytest.mark.parametrize(
    ("quantization", "format_name"),
    [("nf4", "bnb-nf4-dq"), ("fp4", "bnb-fp4-dq"), ("int8", "bnb-int8")],
)
def test_a_model_directory_loads_with_bitsandbytes_layers(model_dir, quantization, format_name):
    model, tokenizer = load_model(model_dir, quantization=quantization, progress=False)
    formats = [quantized.describe(m) for m in model.modules() if quantized.is_quantized(m)]
    assert formats == [format_name] * 14  # the 7 projections of both blocks; lm_head stays float
    assert type(model.lm_head) is torch.nn.Linear
    assert model.config.pad_token_id == tokenizer.pad_token_id
    float_model, _ = load_model(model_dir, progress=False)
    ids = tiny_models.input_ids(vocab=len(tokenizer))
    with torch.no_grad():
        difference = (model.train()(ids).logits - float_model(ids).logits).abs().max()
    assert 0 < difference < 0.5  # quantized: close to the float model, not equal


def test_unknown_quantization_and_gguf_without_a_gguf_file_are_user_errors(model_dir):
    with pytest.raises(UserError, match=r"unknown quantization 'q3'.*nf4, fp4, int8, gguf"):
        load_model(model_dir, quantization="q3")
    with pytest.raises(UserError, match="no GGUF file"):
        load_model(model_dir, quantization="gguf")


@pytest.mark.integration
def test_smollm2_loads_with_the_gguf_blocks_of_its_file():
    model, _ = load_model("smollm2-135m-instruct", quantization="gguf", progress=False)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 210 and {m.block_type for m in layers} == {"Q4_1"}
    float_model, _ = load_model("smollm2-135m-instruct", progress=False)
    ids = torch.tensor([[1, 504, 3437, 314, 253, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, float_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_loader_keeps_4bit_bytes_as_loaded_in_eval_mode(model_dir):
    model, tokenizer = load_model(model_dir, quantization="nf4", progress=False)
    layers = [m for m in model.modules() if quantized.is_quantized(m)]
    before = [quantized.storage(m)["codes"].clone() for m in layers]
    ids = tiny_models.input_ids(vocab=len(tokenizer))
    with torch.no_grad():
        eval_logits = model.eval()(ids).logits  # bitsandbytes would repack here on AVX512-BF16
        train_logits = model.train()(ids).logits
    assert all(
        torch.equal(b, quantized.storage(m)["codes"]) for b, m in zip(before, layers, strict=True)
    )
    assert not any(m.weight.quant_state.__dict__.get("packing_format_for_cpu") for m in layers)
    torch.testing.assert_close(eval_logits, train_logits, rtol=1e-5, atol=1e-5)
