"""The numbers of docs/quantized.md: what an honest merge and a re-quantizing merge cost on a
quantized base, how bitsandbytes' own eval-mode CPU kernels differ from ``x W0^T``, and what a
GGUF base holds in memory. Runs in about a minute on a CPU:

    python3 experiments/quantized_merge.py

1. One 1024 x 1024 linear layer per format, a rank-16 update scaled to |dW| / |W0| = 0.01, 0.05,
   0.20, 256 standard-normal inputs: relative output difference (Frobenius) from the unmerged
   quantized layer, for lorakit's float merge and for ``requantize``.
2. A tiny Llama loaded with transformers' ``BitsAndBytesConfig`` (NF4 + double quantization),
   all projections adapted (rank 8, random B != 0): relative logits difference of
   ``merge_and_unload`` from the unmerged model, lorakit vs peft.
3. bitsandbytes in eval mode without gradients on this CPU: ``Linear8bitLt`` also quantizes the
   activations (LLM.int8 inference), ``Linear4bit`` repacks itself for a bf16 kernel where the CPU
   has AVX512-BF16: relative output difference from ``x W0^T + b``.
4. SmolLM2-135M's block linears as GGUF blocks (``GGUFLinear``) vs float32.
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import torch
import torch.nn.functional as F

import lorakit
from lorakit import functional, quantized
from lorakit.quantized.merge import float_linear, merged_weight, requantize

warnings.filterwarnings("ignore")


def _bnb_4bit(linear, quant_type="nf4", double_quant=True):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
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
    layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


def _bnb_8bit(linear):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").requires_grad_(False)


def _torchao_int8(linear):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = copy.deepcopy(linear).requires_grad_(False)
    quantize_(layer, Int8WeightOnlyConfig())
    return layer


def _gguf(linear, block_type):
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from lorakit.quantized.gguf_blocks import GGUFLinear

    packed = quants.quantize(linear.weight.detach().numpy(), GGMLQuantizationType[block_type])
    bias = linear.bias.detach().clone()
    return GGUFLinear(torch.from_numpy(np.ascontiguousarray(packed)), block_type, 1024, bias)


def merge_errors() -> None:
    print("1. merge on one 1024 x 1024 layer: relative output difference from the unmerged layer")
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 1024)
    x = torch.randn(256, 1024)
    builders = {
        "bnb-nf4-dq": _bnb_4bit,
        "bnb-int8": _bnb_8bit,
        "torchao-int8-weight-only": _torchao_int8,
        "gguf-Q4_1": lambda lin: _gguf(lin, "Q4_1"),
        "gguf-Q8_0": lambda lin: _gguf(lin, "Q8_0"),
    }
    print(f"   {'format':26s} {'|dW|/|W0|':>9s} {'float merge':>12s} {'requantize':>11s}")
    for name, build in builders.items():
        layer = build(linear).train()  # bnb's training-mode kernels compute x W0^T
        weight = quantized.dequantized_weight(layer)
        for size in (0.01, 0.05, 0.20):
            generator = torch.Generator().manual_seed(1)
            delta = functional.delta_weight(
                torch.randn(16, 1024, generator=generator),
                torch.randn(1024, 16, generator=generator),
                2.0,
            )
            delta = delta * (size * weight.norm() / delta.norm())
            with torch.no_grad():
                unmerged = quantized.base_forward(layer, x) + x @ delta.T
                merged_w = merged_weight(layer, [delta])
                merged = float_linear(layer, merged_w, torch.float32)(x)
            float_error = float((merged - unmerged).norm() / unmerged.norm())
            report = requantize(layer, merged_w, x)
            print(
                f"   {name:26s} {size:9.2f} {float_error:12.1e} "
                f"{report.relative_output_error:11.3f}"
            )


def peft_vs_lorakit_merge() -> None:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    print("2. merge_and_unload of a BitsAndBytesConfig NF4 tiny Llama: relative logits difference")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    directory = tempfile.mkdtemp()
    LlamaForCausalLM(config).save_pretrained(directory)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    fields = dict(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    for library in ("lorakit", "peft"):
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=quantization, device_map="cpu", dtype=torch.float32
        ).train()
        if library == "lorakit":
            model = lorakit.inject(model, lorakit.LoraConfig(**fields))
        else:
            model = peft.get_peft_model(model, peft.LoraConfig(**fields))
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, parameter in sorted(model.named_parameters()):
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            unmerged = model(ids).logits
            if library == "lorakit":
                with lorakit.disabled(model):
                    base = model(ids).logits
                effect = float((unmerged - base).norm() / base.norm())
                print(f"   (the adapter itself moves the logits by {effect:.1e})")
            if library == "lorakit":
                merged_model = lorakit.merge_and_unload(model)
            else:
                merged_model = model.merge_and_unload()
            merged = merged_model.train()(ids).logits
        print(f"   {library:8s} {float((merged - unmerged).norm() / unmerged.norm()):.1e}")


def bnb_eval_kernels() -> None:
    print("3. bitsandbytes' own eval-mode CPU kernels vs x W0^T + b (1024 x 1024, 256 inputs)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 1024)
    x = torch.randn(256, 1024)
    for name, layer in (
        ("Linear4bit nf4-dq", _bnb_4bit(linear)),
        ("Linear8bitLt", _bnb_8bit(linear)),
    ):
        weight = quantized.dequantized_weight(layer)
        wanted = F.linear(x, weight, layer.bias)
        with torch.no_grad():
            got = layer.eval()(x)
        repacked = getattr(
            getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False
        )
        error = float((got - wanted).norm() / wanted.norm())
        print(f"   {name:18s} {error:.1e}" + ("  (repacked in place)" if repacked else ""))


def gguf_memory() -> None:
    from gguf import GGUFReader

    from lorakit.models import BUILTIN_MODELS, _package_folder
    from lorakit.quantized.gguf_file import gguf_linear, llama_module_name

    builtin = BUILTIN_MODELS["smollm2-135m-instruct"]
    reader = GGUFReader(_package_folder(builtin) / builtin.relative_path)
    packed = floats = 0
    for tensor in reader.tensors:
        if llama_module_name(tensor.name) is not None:
            module = gguf_linear(tensor)
            packed += module.packed.numel()
            floats += module.in_features * module.out_features * 4
    print(
        f"4. SmolLM2-135M block linears: {packed / 2**20:.1f} MiB as GGUF blocks, "
        f"{floats / 2**20:.1f} MiB in float32 ({floats / packed:.1f}x)"
    )


if __name__ == "__main__":
    merge_errors()
    peft_vs_lorakit_merge()
    bnb_eval_kernels()
    gguf_memory()
