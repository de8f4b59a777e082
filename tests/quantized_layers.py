"""Small quantized linear layers for the tests of ``lorakit.quantized``: each built from a known
float layer, so tests can compare with it. bitsandbytes and torchao are imported here only."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lorakit.quantized.gguf_blocks import GGUFLinear


def float_linear(out_features: int = 48, in_features: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=True)


def bnb_4bit(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """``linear`` stored as a bitsandbytes ``Linear4bit`` (quantized on the CPU)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


def bnb_8bit(linear: nn.Linear) -> nn.Module:
    """``linear`` stored as a bitsandbytes ``Linear8bitLt`` (LLM.int8, no fp16 copy kept)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=0.0,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").requires_grad_(False)


def torchao_int8(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` whose weight is torchao's weight-only ``Int8Tensor``."""
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = copy.deepcopy(linear).requires_grad_(False)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer


def gguf(linear: nn.Linear, block_type: str = "Q4_1") -> GGUFLinear:
    """``linear`` stored as GGUF blocks (quantized by the ``gguf`` package's numpy reference)."""
    from gguf import GGMLQuantizationType, quants

    values = linear.weight.detach().numpy().astype(np.float32)
    packed = quants.quantize(values, GGMLQuantizationType[block_type])
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return GGUFLinear(
        torch.from_numpy(np.ascontiguousarray(packed)), block_type, values.shape[1], bias
    )


QUANTIZERS = {
    "bnb-nf4-dq": lambda linear: bnb_4bit(linear, "nf4", True),
    "bnb-nf4": lambda linear: bnb_4bit(linear, "nf4", False),
    "bnb-fp4-dq": lambda linear: bnb_4bit(linear, "fp4", True),
    "bnb-fp4": lambda linear: bnb_4bit(linear, "fp4", False),
    "bnb-int8": bnb_8bit,
    "torchao-int8-weight-only": torchao_int8,
    "gguf-Q4_0": lambda linear: gguf(linear, "Q4_0"),
    "gguf-Q4_1": lambda linear: gguf(linear, "Q4_1"),
    "gguf-Q8_0": lambda linear: gguf(linear, "Q8_0"),
}


def quantize_linears(model: nn.Module, name: str, only: tuple[str, ...] = ("proj",)) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose name ends with one of ``only``
    by its ``name`` quantization (``QUANTIZERS``); returns ``model``."""
    for module_name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module_name.endswith(only):
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QUANTIZERS[name](module))
    return model


def dequantized_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized ``model`` whose quantized linears are float ``nn.Linear`` holding
    their dequantized weights: the float reference a LoRA on the quantized model must match."""
    import copy

    from lorakit import quantized

    twin = copy.deepcopy(model)
    for module_name, module in list(twin.named_modules()):
        if module_name and quantized.is_quantized(module):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None
            )
            with torch.no_grad():
                linear.weight.copy_(quantized.dequantized_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, child = module_name.rpartition(".")
            setattr(twin.get_submodule(parent_name), child, linear.requires_grad_(False))
    return twin


def output_and_gradients(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple:
    """(output, dL/dx, dL/dA, dL/dB) of ``sum(out * weights)`` for ``model`` = a one-layer
    ``nn.Sequential`` holding a LoRA layer with adapter ``default``; dropout seed ``seed``."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    layer = model[0]
    grads = (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    result = (out.detach(), x.grad, *(g.clone() for g in grads))
    layer.zero_grad(set_to_none=True)
    return result


def greedy_logit_error(quantize) -> float:
    """On the tiny Llama with its linears replaced by ``quantize(model)`` and a random adapter
    (q, v, down; B != 0, wrapped as ``QuantizedLoraLinear``): assert that ``lorakit generate``'s
    engine path gives transformers' greedy ids on that same model; return the largest logit
    error of the quantized base (adapter disabled) against the float model, over the largest
    float logit."""
    import lorakit
    from lorakit.commands.generate import engine_greedy
    from lorakit.layers import QuantizedLoraLinear
    from lorakit.state import lora_layers
    from tests import tiny_models

    float_model = tiny_models.llama()
    model = tiny_models.llama()
    quantize(model)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    assert {type(layer) for _, layer in lora_layers(model)} == {QuantizedLoraLinear}
    model.generation_config.eos_token_id = None
    prompt = [5, 9, 2, 7, 7, 1]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, len(prompt) :]
        with lorakit.disabled(model):
            quantized_logits = model(ids).logits
        float_logits = float_model(ids).logits
    assert engine_greedy(model, prompt, 8) == expected.tolist()
    return float((quantized_logits - float_logits).abs().max() / float_logits.abs().max())
