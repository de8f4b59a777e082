"""``merge_and_unload`` on a quantized base (``lorakit.quantized``): which quantized layers it
can dequantize, checked before any change (a refusal names the module and its class); whether
the output layer is quantized (then the result's config is untied from the input embedding);
and every quantized linear left replaced by a float ``nn.Linear`` holding ``dequant(W0)``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lorakit import quantized
from lorakit.float_dtypes import unwrapped
from lorakit.quantized.merge import float_linear
from lorakit.wrapped_modules import replace_module

__all__ = [
    "check_quantized_layers",
    "dequantize_remaining",
    "named_refusal",
    "output_layer_quantized",
]


# A LoRA layer's base module is named ``<layer>.base_layer``: refusals name the layer (the module
# the user targeted, e.g. ``model.layers.0.self_attn.q_proj``).
_BASE_LAYER_SUFFIX = re.compile(r"(?:\.base_layer)+$")


def check_quantized_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds quantized layers (``lorakit.quantized``), each checked to be one
    ``merge_and_unload`` can dequantize (``quantized.check_supported`` raises otherwise, and so
    does ``_check_dequantizable``, naming the module), adapted or not: before any change."""
    found_quantized = False
    for name, module in model.named_modules():
        if quantized.is_quantized(module):
            quantized.check_supported(module, name)
            _check_dequantizable(_BASE_LAYER_SUFFIX.sub("", name), module)
            found_quantized = True
    return found_quantized


def _check_dequantizable(name: str, module: nn.Module) -> None:
    """Refuse, naming the module, a quantized layer its backend can run but not dequantize
    exactly (``check_dequantizable``: a bitsandbytes ``Linear4bit`` repacked for its CPU kernel
    by ``use_bnb_cpu_kernel``); backends without that check dequantize every usable layer."""
    check = getattr(quantized.backend_for(module), "check_dequantizable", None)
    if check is None:
        return
    try:
        check(module)
    except quantized.UnsupportedQuantizedLayerError as error:
        raise named_refusal(name, module, error) from None


def named_refusal(
    name: str, module: nn.Module, error: Exception
) -> quantized.UnsupportedQuantizedLayerError:
    """``error``'s refusal, naming the module and its class: ``module 'x' (Linear4bit): ...``."""
    return quantized.UnsupportedQuantizedLayerError(
        f"module {name!r} ({type(module).__name__}): {str(error).rstrip('.')}. Nothing was changed."
    )


def output_layer_quantized(model: nn.Module) -> bool:
    """Whether ``model``'s output layer (``get_output_embeddings()``, under lorakit's wrappers)
    is quantized. Such a layer is never the input embedding, even where the config says tied
    (lorakit's ``int8-rows`` / ``int4-groups`` quantize a copy of a tied head, the embedding
    stays float): ``merge_and_unload`` dequantizes it into a float layer that differs from the
    embedding, so it sets ``config.tie_word_embeddings = False``. Re-tying to the float
    embedding would change the outputs (the head computed with the quantized copy), and a
    config left tied makes transformers swap the head for the embedding on ``tie_weights()``
    and warn on reload."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return False
    try:
        output = unwrapped(getter())
    except (AttributeError, NotImplementedError):  # a model without an output layer
        return False
    return output is not None and quantized.is_quantized(output)


def dequantize_remaining(model: nn.Module, float_dtype: torch.dtype) -> None:
    """Replace every quantized linear left in ``model`` by a float ``nn.Linear`` holding its
    dequantized weight, and drop transformers' record of the quantization."""
    for name, module in list(model.named_modules()):
        if name and quantized.is_quantized(module):
            weight = quantized.dequantized_weight(module)
            replace_module(model, name, float_linear(module, weight, float_dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
