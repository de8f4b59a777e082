"""Shared by the GGUF tests: tiny Qwen2 / Mistral models, saved adapters (lorakit's and the real
peft's) with non-zero B, and
the independent oracles (the ``gguf`` package's reader, transformers' inverse of llama.cpp's
q/k permutation)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from tokenizers import processors
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lorakit
from tests import tiny_models, tiny_tokenizer

SIZES = tiny_models.DECODER_SIZES  # the tiny Llama's sizes, for Qwen2 and Mistral too


def qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()


def mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**SIZES)).eval()


BUILDERS = {"llama": tiny_models.llama, "qwen2": qwen2, "mistral": mistral}


def saved_adapter(directory, base: torch.nn.Module, std: float = 0.2, **config_fields):
    """``(adapted copy of base, directory)``: a random adapter (B != 0) saved in PEFT's format."""
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    adapted = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**(fields | config_fields)))
    tiny_models.randomize_adapters(adapted, std=std)
    lorakit.save_adapter(adapted, directory)
    return adapted, directory


def peft_adapter(directory, base: torch.nn.Module, **fields):
    """A PEFT (the real package) LoRA on ``base``, every trainable tensor moved off its init
    (B != 0), saved in ``directory``; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model  # (peft only where a test asks for it)

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **fields)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory)
    return peft_model


def reader_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float64, numpy axis order, read by the ``gguf`` package."""
    import gguf

    reader = gguf.GGUFReader(path)
    arrays = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        arrays[tensor.name] = np.asarray(values, dtype=np.float64).reshape(
            tuple(int(n) for n in reversed(tensor.shape))
        )
    return arrays


def reader_fields(path) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if "." in key}


def transformers_row_order(array: np.ndarray, gguf_name: str, config) -> np.ndarray:
    """transformers' own inverse of llama.cpp's q/k permutation (its GGUF loader's
    ``LlamaTensorProcessor``): rows in GGUF order -> rows in transformers order."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(
        config={
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
        }
    )
    return processor.process(array, gguf_name).weights


def with_trained_copy(model, module: str):
    """``model`` (in place) with an adapter on ``q_proj`` (B non-zero) whose
    ``modules_to_save=[module]`` copy is trained: moved 0.5 away from the module it copies (on a
    tied model, away from the tied matrix)."""
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=[module]
    )
    adapted = lorakit.inject(model, config)
    tiny_models.randomize_adapters(adapted, std=0.2)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.5)
    return adapted


BOS, EOS = "<|endoftext|>", "<|im_end|>"
TEMPLATES = {  # name -> (single, pair) of a TemplateProcessing post-processor
    "bos": (f"{BOS} $A", f"{BOS} $A {BOS} $B"),  # Llama 3's tokenizer.json
    "eos": (f"$A {EOS}", f"$A {EOS} $B {EOS}"),
    "both": (f"{BOS} $A {EOS}", f"{BOS} $A {EOS} $B {EOS}"),
}


def with_post_processor(template: str | None) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer with bos ``<|endoftext|>`` and eos ``<|im_end|>``,
    adding them through a ``TemplateProcessing`` post-processor (none for ``None``)."""
    backend = tiny_tokenizer.build().backend_tokenizer
    if template is not None:
        single, pair = TEMPLATES[template]
        ids = [(token, backend.token_to_id(token)) for token in (BOS, EOS)]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=ids
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)
