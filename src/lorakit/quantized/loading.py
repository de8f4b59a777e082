"""Load a model's linear layers quantized, by name: what ``lorakit.models.load_model(spec,
quantization=...)`` does.

===========  ===========================================================================
``nf4``      bitsandbytes 4-bit NF4 with double quantization (QLoRA's choice; without it for
             an adapter trained so), computing in the model's dtype: ``BitsAndBytesConfig``
``fp4``      bitsandbytes 4-bit FP4, double quantization as ``nf4``
``int8``     bitsandbytes LLM.int8 (``load_in_8bit=True``)
``gguf``     the GGUF blocks of a built-in GGUF model's file (SmolLM2: Q4_1), in place of its
             block linears (``gguf_file.replace_llama_linears``): exactly what llama.cpp runs
``int8-rows``  weight-only int8 with one scale per output row, every ``nn.Linear`` (the
             output layer included; a model with none in its blocks, GPT-2's Conv1D, is
             refused: ``refuse_no_block_layer``) quantized on load by lorakit (``int8_rows.quantize_linears``):
             the fast CPU base for decoding (no extra package); a sequence classifier's
             head stays float (``weight_only_part``), and so do the layers the model's class
             keeps in float (``weight_only.kept_in_float``: T5's ``wo``, as for bitsandbytes)
             and those whose weight transformers' code reads (Mamba's ``dt_proj``)
``int4-groups``  weight-only 4-bit with a scale and an offset per 32 inputs (Q4_1's scheme),
             every linear layer whose sizes are multiples of 32 (``int4_groups``): half of
             int8-rows' bytes, the fastest CPU base for one-stream decoding
===========  ===========================================================================

bitsandbytes models are loaded on the CPU (``device_map="cpu"``); transformers keeps the output
layer (and a tied one) in float, as it does for every bitsandbytes load; a model whose code
reads the weight of a layer bitsandbytes quantized (Mamba's ``dt_proj.weight @ x``) is refused
(``refuse_bitsandbytes_weight_reads``), or, where a float weight holding ``dequant(W0)`` serves
that read (Gemma3n's AltUp coefficients), the layer is put back in float
(``float_bitsandbytes_reads``). The loader turns off
bitsandbytes' in-place repacking of 4-bit layers for its AVX512-BF16 CPU inference kernel
(``keep_4bit_storage``; ``lorakit.inject`` does the same on a model built elsewhere): the stored
bytes stay as loaded in every mode, and an eval-mode forward computes ``x W0^T`` like a training
one (see ``lorakit.quantized.bnb``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.quantization_names import QUANTIZATIONS, TRAINABLE_QUANTIZATIONS

__all__ = [
    "QUANTIZATIONS",
    "TRAINABLE_QUANTIZATIONS",
    "bitsandbytes_config",
    "block_layers",
    "cast_unquantized",
    "check_quantization",
    "float_bitsandbytes_reads",
    "keep_4bit_storage",
    "kept_in_float32",
    "quantize_loaded",
    "refuse_bitsandbytes_weight_reads",
    "refuse_no_block_layer",
    "weight_only_part",
]


def check_quantization(
    quantization: str, gguf_file: Path | None, choices: tuple[str, ...] = QUANTIZATIONS
) -> None:
    """``UserError`` for a name not among ``choices`` (the calling command's), a missing
    package, or ``gguf`` without a GGUF file (naming the other ``choices``)."""
    if quantization not in choices:
        raise UserError(
            f"unknown quantization '{quantization}'; choose one of: {', '.join(choices)}"
        )
    if quantization == "gguf":
        if gguf_file is None:
            others = ", ".join(name for name in choices if name != "gguf")
            raise UserError(
                "quantization 'gguf' reads the blocks of a built-in GGUF model's file (e.g. "
                f"smollm2-135m-instruct); this model has no GGUF file. Choose another: {others}"
            )
        return
    if quantization in ("int8-rows", "int4-groups"):
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"quantization '{quantization}' needs bitsandbytes; install it with: "
            'pip install "lorakit[quant]"'
        )


def bitsandbytes_config(
    quantization: str, compute_dtype: torch.dtype, double_quantization: bool = True
):
    """transformers' ``BitsAndBytesConfig`` for ``nf4``, ``fp4`` (``double_quantization``:
    bitsandbytes' ``bnb_4bit_use_double_quant``) or ``int8``."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quantization,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_4bit_storage(model: torch.nn.Module) -> int:
    """Turn off, on every bitsandbytes ``Linear4bit`` of ``model``, the eval-mode CPU repacking
    of its stored bytes (``support_avx512bf16_for_cpu``); returns how many layers. lorakit's
    loader does it on load, and ``lorakit.inject`` / ``load_adapter`` on any model they adapt
    (its layers adapted or not), so the bytes stay the checkpoint's and ``merge_and_unload``
    can read them. Changes nothing on a model without such layers."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantize_loaded(model: torch.nn.Module, quantization: str, gguf_file: Path | None) -> None:
    """What ``lorakit.models.load_model`` does to a model transformers has just loaded, for
    ``quantization`` (checked by ``check_quantization``): the built-in GGUF file's blocks in
    place of its Llama linears (``gguf``), lorakit's weight-only formats (``int8-rows``,
    ``int4-groups``; the layers the model's class keeps in float, ``kept_in_float`` of the
    whole model, stay float), or, for bitsandbytes (quantized while loading), its stored 4-bit
    bytes kept as they are (``keep_4bit_storage``), once ``refuse_bitsandbytes_weight_reads``
    has passed it, and the layers ``float_bitsandbytes_reads`` names back in float."""
    if quantization == "gguf":
        from lorakit.quantized.gguf_file import replace_llama_linears

        replace_llama_linears(model, gguf_file)
    elif quantization in ("int8-rows", "int4-groups"):
        from lorakit.quantized import int4_groups, int8_rows
        from lorakit.quantized.weight_only import kept_in_float

        backend = int8_rows if quantization == "int8-rows" else int4_groups
        refuse_no_block_layer(model, quantization)
        backend.quantize_linears(weight_only_part(model), keep=kept_in_float(model))
    else:
        refuse_bitsandbytes_weight_reads(model, quantization)
        float_bitsandbytes_reads(model)
        keep_4bit_storage(model)


def float_bitsandbytes_reads(model: torch.nn.Module) -> int:
    """Put back in float, after a bitsandbytes load, the layers whose weight transformers' code
    reads in a way the packed codes fail but a float weight takes
    (``weight_only.bitsandbytes_float_layers``: Gemma3n's AltUp coefficients, clamped in place,
    ``weight.data.clamp_``, when training): each becomes an ``nn.Linear`` holding
    ``dequant(W0)`` (float32; ``cast_unquantized`` casts it on) and its bias, the function the
    quantized layer computed, so the model trains. Tiny layers (Gemma3n E2B: 80 numbers each).
    Returns how many."""
    from lorakit import quantized
    from lorakit.quantized.weight_only import bitsandbytes_float_layers

    layers = bitsandbytes_float_layers(model)
    names = [name for name in layers if quantized.is_quantized(model.get_submodule(name))]
    for name in names:
        layer = model.get_submodule(name)
        out_features, in_features = quantized.shape(layer)
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(quantized.dequantized_weight(layer))  # (out, in)
        if layer.bias is not None:
            linear.bias = torch.nn.Parameter(layer.bias.detach().float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(names)


def refuse_bitsandbytes_weight_reads(model: torch.nn.Module, quantization: str) -> None:
    """``UserError`` when transformers' code for ``model`` reads the weight of a layer that
    bitsandbytes has quantized, in a way that fails or goes wrong on its packed codes
    (``weight_only.weight_reads``: Mamba's ``self.dt_proj.weight @ x``, a shape or dtype error
    at every forward). Names the model, the layer, and the ways out: lorakit's int8-rows or
    int4-groups, which keep such layers float, or no quantization."""
    from lorakit.quantized.weight_only import weight_reads

    broken = [
        (name, reader)
        for name, reader, fails_on_bitsandbytes in weight_reads(model)
        if fails_on_bitsandbytes and type(model.get_submodule(name)) is not torch.nn.Linear
    ]
    if not broken:
        return
    (name, reader), more = broken[0], len(broken) - 1
    others = f" (and {more} more such layer{'s' * (more > 1)})" if more else ""
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise UserError(
        f"--quantization {quantization}: this {type(model).__name__} (model type "
        f"'{model_type}') cannot run on a bitsandbytes base: transformers' {reader} reads the "
        f"weight of {name}{others} itself, which bitsandbytes holds as packed codes, so every "
        "forward would fail or go wrong; choose int8-rows or int4-groups (lorakit keeps such "
        "layers float), or load the model without --quantization"
    )


def block_layers(model: torch.nn.Module, quantization: str) -> int:
    """How many layers other than the output layer lorakit's weight-only ``quantization``
    (``int8-rows``, ``int4-groups``) would store quantized in ``model``: the ``nn.Linear`` s
    (exact type: not GPT-2's ``Conv1D``) of ``weight_only_part`` but those kept in float
    (``weight_only.kept_in_float``), for int4-groups only those whose sizes are multiples of
    32 (``int4_groups.fits``)."""
    from lorakit.quantized.int4_groups import fits
    from lorakit.quantized.weight_only import kept_in_float

    getter = getattr(model, "get_output_embeddings", None)
    skipped = {getter() if getter is not None else None, *kept_in_float(model)}
    return sum(
        1
        for module in weight_only_part(model).modules()
        if type(module) is torch.nn.Linear
        and module not in skipped
        and (quantization != "int4-groups" or fits(*module.weight.shape))
    )


def refuse_no_block_layer(model: torch.nn.Module, quantization: str) -> None:
    """``UserError`` (loading and ``lorakit plan``) when ``quantization`` would store none of
    ``model``'s block layers quantized (``block_layers`` is 0): the base would stay float, or
    grow by an int8 copy of a tied output layer, for no gain. The error names the ways out
    that take this model: int8-rows first when int4-groups only lacks sizes that are multiples
    of 32 (int8 rows take any shape), then bitsandbytes' nf4, fp4 and int8. Never gguf: only a
    built-in model ships a GGUF file, and the one there is (SmolLM2) has block layers."""
    if block_layers(model, quantization):
        return
    name = type(model).__name__
    linears = block_layers(model, "int8-rows")
    if quantization == "int4-groups" and linears:
        raise UserError(
            f"--quantization int4-groups: no layer of this {name} would be stored quantized "
            f"(int4-groups takes layers whose sizes are multiples of 32 and leaves the others "
            f"in float; none of its {linears} block layers has such sizes); choose int8-rows, "
            f"which takes any shape (it would store its {linears} block layers), or nf4, fp4 "
            "or int8"
        )
    raise UserError(
        f"--quantization {quantization}: no layer of this {name} would be stored quantized "
        "(lorakit's int8-rows and int4-groups take nn.Linear layers only, not GPT-2's "
        "Conv1D, and leave those its class keeps in float); choose nf4, fp4 or int8"
    )


def cast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast, in place, ``model``'s floating-point parameters that are not quantized storage to
    ``dtype``, as ``from_pretrained(dtype=)`` would have loaded them: those of the modules no
    quantized backend runs (embeddings, norms, a float head) and a quantized layer's plain
    ``bias``; quantized storage (codes, scales) keeps its dtypes, and buffers (rotary
    frequencies) stay as loaded. A parameter the model class keeps in float32 at ``dtype``
    (``kept_in_float32``: RWKV's ``time_decay`` at float16, a Dots1 router's ``gate.weight`` at
    float16 and bfloat16) is float32, as transformers loads it; a tied parameter is cast once,
    to float32 if any of its names is kept."""
    from lorakit.quantized import is_quantized

    kept = kept_in_float32(model, dtype)
    targets: dict[int, tuple[torch.nn.Parameter, torch.dtype]] = {}
    for module_name, module in model.named_modules():
        if is_quantized(module):
            bias = getattr(module, "bias", None)
            named = [("bias", bias)] if isinstance(bias, torch.nn.Parameter) else []
        else:
            named = list(module.named_parameters(recurse=False))
        for name, parameter in named:
            full = f"{module_name}.{name}" if module_name else name
            wanted = torch.float32 if kept is not None and kept.search(full) else dtype
            if targets.get(id(parameter), (None, None))[1] != torch.float32:
                targets[id(parameter)] = (parameter, wanted)
    for parameter, wanted in targets.values():
        if parameter.is_floating_point() and parameter.dtype != wanted:
            parameter.data = parameter.data.to(wanted)


def kept_in_float32(model: torch.nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """The names ``from_pretrained(dtype=)`` loads in float32 whatever ``dtype``, as one regex
    to ``search`` a parameter's full name with (None: none). transformers' rule
    (``PreTrainedModel._get_dtype_plan``, matched by ``core_model_loading``'s
    ``build_glob_alternation``): the model's ``_keep_in_fp32_modules`` at float16 only, its
    ``_keep_in_fp32_modules_strict`` at float16 and bfloat16 (an instance's lists gather its
    submodels'), each entry a regex with ``*`` read as ``.*``, found anywhere in the name
    (``"time_decay"`` keeps ``rwkv.blocks.0.attention.time_decay``)."""
    patterns: list[str] = []
    if dtype == torch.float16:
        patterns += sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        patterns += sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{pattern.replace('*', '.*')})" for pattern in patterns))


def weight_only_part(model: torch.nn.Module) -> torch.nn.Module:
    """What lorakit's weight-only formats quantize: all of a language model (its output layer
    included), only the body (``model.base_model``) of any other model, so a classification
    head (new, random, to be trained) stays in float, as bitsandbytes keeps it."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is not None and getter() is not None:
        return model
    return getattr(model, "base_model", model)
