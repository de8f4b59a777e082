"""Bytes a quantized frozen base takes, before it is loaded (``lorakit plan --quantization``).

Which layers are quantized: for bitsandbytes (nf4, fp4, int8), exactly those transformers'
bitsandbytes loading replaces with lorakit's ``BitsAndBytesConfig`` (``bitsandbytes_linears``):
every ``nn.Linear`` and ``Conv1D`` (GPT-2's) but the output layer, tied weights and the module
owning the model's last parameter (a Llama classifier's ``score`` stays float; BERT's last
parameter is ``classifier.bias``, which names no module, so its classifier is quantized); for
GGUF every ``nn.Linear`` and ``Conv1D`` but the output layer (and the input embeddings it may be
tied to). Embeddings, norms and biases stay in the model's float dtype. lorakit's own CPU
formats (``int8_rows`` / ``int4_groups``, ``--quantization int8-rows`` / ``int4-groups`` on
load) also store the output layer in int8 rows, a tied one as its own copy (the embedding keeps
its float weight); int4-groups leaves a layer whose sizes are not multiples of 32 in float, both
the layers the class keeps in float (T5's ``wo``); they take ``nn.Linear`` layers only (no GPT-2
Conv1D projection: on GPT-2 only the tied output layer's int8-rows copy is stored, it grows).

Bytes of one (d, k) weight, n = d k (what the layer stores, ``lorakit.quantized.storage``)::

    nf4, fp4 (bitsandbytes 4-bit, double quantization, QLoRA's setting; blocks of 64 weights):
        ceil(n / 2)                     two 4-bit codes a byte
      + ceil(n / 64)                    one 8-bit absmax per block (quantized itself)
      + 4 ceil(ceil(n / 64) / 256)      one float32 absmax per 256 absmax values
      + 4                               the float32 offset of the quantized absmax
      ~ 0.5159 bytes a weight (without double quantization: 0.5 + 4 / 64 = 0.5625)
    int8 (LLM.int8): n + 4 d            one int8 a weight, one float32 scale a row
    q4_0 / q4_1 / q8_0 (GGUF, blocks of 32 weights along a row): (n / 32) * 18 / 20 / 34
    int8-rows: n + 2 d                  one int8 a weight, one bfloat16 scale a row
    int4-groups: n / 2 + 4 n / 32       half a byte a weight, a bfloat16 scale and offset per
                                        group of 32 inputs: 0.625 bytes a weight

(The quantization maps, 256 float32 values per state, and Python objects are left out.)

Backward on int8-rows / int4-groups rebuilds each layer's weight to pass the gradient on
(``dL/dx = dL/dy W0``, ``weight_only._FrozenMatmul``), while the activations are alive: the
largest such transient is part of a training step's peak (``lorakit.plan_memory``). For a
(d, k) layer whose gradient arrives in b-byte elements (``dequantized_backward_bytes``)::

    int8-rows:    4 d k + b d k     W0 in float32 (scaled in place), then its copy in the
                                    gradient's dtype (none when b = 4: 4 d k)
    int4-groups:  49 d k / 4        the unpacked codes widened to float32 and shifted, times
                                    the scales, plus the offsets: three float32 (d, k) at once,
                                    and the (d, k / 32, 2) scales in float32

SmolLM2-135M's output layer (49,152 x 576) in int8 rows under a bfloat16 step: 0.17 GB.
Llama-2-7B in NF4: 6,476,005,376 weights in the 224 block linears take 3.34 GB, the float16
embeddings, output layer and norms 0.52 GB: 3.87 GB in all, 3.6 GiB.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lorakit.quantized.int4_groups import GROUP, fits

__all__ = [
    "BASE_QUANTIZATIONS",
    "BITSANDBYTES",
    "WEIGHT_ONLY",
    "bitsandbytes_kept_float",
    "bitsandbytes_linears",
    "dequantized_backward_bytes",
    "quantized_base",
    "quantized_linears",
    "weight_bytes",
    "weight_only_layers",
    "weight_only_shapes",
]

BNB_BLOCK, BNB_NESTED_BLOCK = 64, 256
GGUF_BLOCK = 32
GGUF_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
BITSANDBYTES = ("nf4", "fp4", "int8")  # quantized by transformers while loading
WEIGHT_ONLY = ("int8-rows", "int4-groups")  # lorakit's CPU formats (lorakit.quantized)
BASE_QUANTIZATIONS = (*BITSANDBYTES, *GGUF_BLOCK_BYTES, *WEIGHT_ONLY)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def weight_bytes(quantization: str, out_features: int, in_features: int) -> int:
    """Bytes of a (``out_features``, ``in_features``) weight stored as ``quantization`` (see the
    module docstring). ``ValueError`` for an unknown name, or a GGUF row not whole blocks."""
    n = out_features * in_features
    if quantization in ("nf4", "fp4"):
        blocks = _ceil_div(n, BNB_BLOCK)
        return _ceil_div(n, 2) + blocks + 4 * _ceil_div(blocks, BNB_NESTED_BLOCK) + 4
    if quantization == "int8":
        return n + 4 * out_features
    if quantization == "int8-rows":
        return n + 2 * out_features
    if quantization == "int4-groups":
        if not fits(out_features, in_features):
            raise ValueError(
                f"int4-groups takes sizes that are multiples of {GROUP}; got "
                f"{out_features} x {in_features}"
            )
        return n // 2 + 4 * (n // GROUP)
    if quantization in GGUF_BLOCK_BYTES:
        if in_features % GGUF_BLOCK:
            raise ValueError(
                f"a {quantization} row holds whole blocks of {GGUF_BLOCK} weights; "
                f"in_features={in_features} is not a multiple"
            )
        return n // GGUF_BLOCK * GGUF_BLOCK_BYTES[quantization]
    raise ValueError(
        f"unknown quantization {quantization!r}; choose one of: {', '.join(BASE_QUANTIZATIONS)}"
    )


def quantized_linears(model: nn.Module, quantization: str) -> list[tuple[str, nn.Module]]:
    """The ``(name, layer)`` pairs a ``quantization`` load stores quantized: for bitsandbytes
    ``bitsandbytes_linears``; for GGUF every ``nn.Linear`` and transformers ``Conv1D`` but the
    output layer (``model.get_output_embeddings()``) and any layer sharing its weight."""
    if quantization in BITSANDBYTES:
        return bitsandbytes_linears(model, quantization)
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = set() if output is None else {id(output), id(output.weight)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and not kept & {id(module), id(module.weight)}
    ]


def bitsandbytes_kept_float(model: nn.Module, quantization: str) -> list[str]:
    """transformers' ``modules_to_not_convert`` for ``model`` loaded with lorakit's config
    (``loading.bitsandbytes_config``; ``HfQuantizer.get_modules_to_not_convert``, as its
    bitsandbytes quantizers call it): its ``llm_int8_skip_modules`` (lorakit passes none), so
    ``get_keys_to_not_convert``'s defaults (transformers 5: the output embeddings, tied weights
    and the module owning the LAST named parameter, ``.weight`` removed), plus the model's
    ``_keep_in_fp32_modules``. A Llama classifier's last parameter is ``score.weight``: its
    ``score`` head stays float; BERT's is ``classifier.bias``, which names no module (only
    ``.weight`` is removed), so its classifier is quantized."""
    from transformers.quantizers.base import HfQuantizer

    from lorakit.quantized.loading import bitsandbytes_config

    config = bitsandbytes_config(quantization, torch.float32)  # the dtype changes no module
    keep_in_fp32 = getattr(model, "_keep_in_fp32_modules", None)
    return list(
        HfQuantizer.get_modules_to_not_convert(
            model,
            config.llm_int8_skip_modules,
            None if keep_in_fp32 is None else list(keep_in_fp32),
        )
    )


def bitsandbytes_linears(model: nn.Module, quantization: str) -> list[tuple[str, nn.Module]]:
    """The layers transformers' bitsandbytes loading (``replace_with_bnb_linear``) replaces with
    ``Linear4bit`` / ``Linear8bitLt`` for ``quantization`` (nf4, fp4, int8): each module of
    exact type ``nn.Linear``, or a ``Conv1D``, whose name no ``bitsandbytes_kept_float``
    pattern matches (transformers' ``should_convert_module``: a pattern matching from the start
    up to a module boundary, as a regex, or as a suffix of the name)."""
    patterns = bitsandbytes_kept_float(model, quantization)
    return [
        (name, module)
        for name, module in model.named_modules()
        if _converted(name, module, patterns)
    ]


def _converted(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """Whether transformers' ``replace_with_bnb_linear`` converts the module ``name``, kept float
    by ``patterns``: transformers 5's (a ``type(module) is nn.Linear`` or a ``Conv1D``, and
    ``should_convert_module``), else transformers 4's (an ``nn.Linear`` or ``Conv1D`` instance
    whose last name part is no pattern, and no pattern equals the name or is in it before a dot)."""
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers 4
        return (
            isinstance(module, (nn.Linear, Conv1D))
            and name.rsplit(".", 1)[-1] not in patterns
            and not any(key == name or key + "." in name for key in patterns)
        )
    is_linear = type(module) is nn.Linear or isinstance(module, Conv1D)
    return is_linear and should_convert_module(name, patterns)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or a ``Conv1D`` (weight (in, out))."""
    out_features, in_features = module.weight.shape
    if not isinstance(module, nn.Linear):
        return in_features, out_features
    return out_features, in_features


def quantized_base(model: nn.Module, quantization: str) -> tuple[int, int]:
    """``(weights, bytes)``: how many float weights ``model`` no longer stores in float, and the
    bytes of its quantized layers."""
    if quantization in WEIGHT_ONLY:
        return _weight_only_base(model, quantization)
    linears = quantized_linears(model, quantization)
    weights = sum(module.weight.numel() for _, module in linears)
    return weights, sum(_layer_bytes(quantization, name, module) for name, module in linears)


def _layer_bytes(quantization: str, name: str, module: nn.Module) -> int:
    """``weight_bytes`` of the layer ``name``; a GGUF row that is not whole blocks is a
    ``ValueError`` naming the layer and the formats that take it."""
    out_features, in_features = linear_shape(module)
    if quantization in GGUF_BLOCK_BYTES and in_features % GGUF_BLOCK:
        raise ValueError(
            f"a {quantization} row holds whole blocks of {GGUF_BLOCK} weights, but layer {name} "
            f"has in_features={in_features}, not a multiple; choose nf4, fp4, int8, int8-rows or "
            "int4-groups (int4-groups leaves such a layer in float)"
        )
    return weight_bytes(quantization, out_features, in_features)


def weight_only_layers(model: nn.Module) -> list[tuple[nn.Linear, bool]]:
    """The layers an int8-rows / int4-groups load replaces, each with whether it is the output
    layer (int8 rows whatever the format): every ``nn.Linear`` (exact type) of
    ``loading.weight_only_part`` (a classifier's head stays float) but those its class keeps in
    float (``weight_only.kept_in_float``: T5's ``wo``, by the names loading saw, ``_as_loaded``).
    Adapters (injected after loading) are not base layers; the output layer's wrapper stands for
    the ``nn.Linear`` it wraps."""
    from lorakit.quantized.loading import weight_only_part
    from lorakit.quantized.weight_only import kept_in_float
    from lorakit.state import lora_layers

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output = getattr(output, "base_layer", output)
    skipped = {id(module) for module in kept_in_float(_as_loaded(model))} | {
        id(module)
        for _, layer in lora_layers(model)
        for name, child in layer.named_children()
        if name != "base_layer"
        for module in child.modules()
    }
    return [
        (module, module is output)
        for module in weight_only_part(model).modules()
        if type(module) is nn.Linear and id(module) not in skipped
    ]


def _as_loaded(model: nn.Module) -> SimpleNamespace:
    """``model`` as ``kept_in_float`` reads it, named as loaded (``.base_layer`` dropped)."""
    names = [(name.replace(".base_layer", ""), module) for name, module in model.named_modules()]
    keep = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
    lists = {key: getattr(model, key, None) for key in keep}
    return SimpleNamespace(named_modules=lambda: names, **lists)


def weight_only_shapes(model: nn.Module) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """``(out, in)`` of the output layer (``(0, 0)`` for none) and the distinct ``(out, in)``
    of the other layers an int8-rows / int4-groups load replaces (``weight_only_layers``)."""
    output, others = (0, 0), set()
    for module, is_output in weight_only_layers(model):
        shape = tuple(module.weight.shape)
        if is_output:
            output = shape
        else:
            others.add(shape)
    return output, tuple(sorted(others))


def dequantized_backward_bytes(
    quantization: str, out_features: int, in_features: int, grad_bytes: int, *, output: bool
) -> int:
    """The bytes a (``out_features``, ``in_features``) layer stored as ``quantization`` holds at
    once while its backward rebuilds its weight, for a gradient of ``grad_bytes``-byte elements
    (the module docstring's formulas: the output layer and int8-rows ``(4 + b) d k``, ``4 d k``
    for b = 4; int4-groups ``49 d k / 4``). 0 where backward rebuilds nothing: a layer
    int4-groups leaves in float, or a format other than int8-rows / int4-groups."""
    n = out_features * in_features
    if quantization not in WEIGHT_ONLY:
        return 0
    if output or quantization == "int8-rows":
        return 4 * n + (0 if grad_bytes == 4 else grad_bytes * n)
    if not fits(out_features, in_features):
        return 0  # stays float: its backward reads the weight as it is
    return 49 * n // 4


def _weight_only_base(model: nn.Module, quantization: str) -> tuple[int, int]:
    """``quantized_base`` for int8-rows / int4-groups: every ``nn.Linear`` (exact type) in that
    format, the output layer in int8 rows, layers int4-groups does not take left in float; a
    tied output layer is an added copy (its weight stays in float with the embedding). Only what
    loading quantizes counts (``weight_only_layers``: a classifier's head stays float)."""
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weights = stored = 0
    for module, is_output in weight_only_layers(model):
        out_features, in_features = module.weight.shape
        kind = "int8-rows" if is_output else quantization
        if kind == "int4-groups" and not fits(out_features, in_features):
            continue  # stays float (as int4_groups.quantize_linears leaves it)
        stored += weight_bytes(kind, out_features, in_features)
        if inputs is None or module.weight is not inputs.weight:
            weights += module.weight.numel()
    return weights, stored
