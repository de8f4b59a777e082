"""A transformers causal LM (optionally merged with an adapter first) -> a full GGUF model file.

What llama.cpp's converter writes for these architectures, and what llama.cpp reads:

- ``{arch}.context_length, embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
  rope.freq_base, rope.dimension_count, vocab_size`` (+ ``attention.key_length/value_length``
  when the head size is not ``hidden / heads``), ``general.file_type``, ``general.name``;
- every weight under its GGUF name (``gguf_names``), Llama's q/k rows in llama.cpp's rotary
  order, ``output.weight`` left out when the head is ``token_embd`` (the same tensor or equal
  values; an adapter's trained head or embedding copy unties them, whatever the config says);
- 1-D tensors (norms, biases) in f32; matrices in the chosen type, except that q8_0 / q4_0 need
  rows of a multiple of 32 values (others are written f16);
- the tokenizer (``gguf_tokenizer``): copied from the GGUF file the model came from when there is
  one (the built-in SmolLM2), else derived from a byte-level BPE tokenizer (``tokenizer.ggml.pre``
  from its own pre-tokenizer, or as the caller names it).

Rotary scaling other than the default (llama3, yarn, ...) is refused: llama.cpp's converter
writes extra keys and tensors for it that lorakit does not produce. So is a Qwen2 whose
``head_dim * num_attention_heads`` is not its hidden size (``gguf_names.check_head_size``):
llama.cpp's qwen2 loader cannot read it. So are configs whose computation llama.cpp's llama /
qwen2 graph does not follow (it always runs SiLU-gated MLPs and full causal attention): a
``hidden_act`` other than SiLU, and sliding-window attention (a Mistral ``sliding_window``
smaller than ``max_position_embeddings``; a Qwen2 with ``use_sliding_window`` or a
"sliding_attention" layer in ``layer_types``). A model still holding quantized layers is
refused too: the GGUF export writes float weights (``_refuse_quantized_layers``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.export.gguf_io import QUANTIZED_BLOCK, TENSOR_TYPES, encode_tensor, write_gguf
from lorakit.export.gguf_names import GgufLayout, check_head_size, gguf_layout

__all__ = ["FILE_TYPES", "export_model", "model_tensors"]

# --type -> gguf.LlamaFileType member (general.file_type)
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
}


def export_model(
    model: nn.Module,
    output: str | os.PathLike[str],
    tensor_type: str = "f16",
    *,
    tokenizer=None,
    tokenizer_gguf: str | os.PathLike[str] | None = None,
    name: str | None = None,
    pre_tokenizer: str | None = None,
) -> Path:
    """Write ``model`` (a plain transformers causal LM: merge adapters first) as a GGUF model.

    ``tokenizer_gguf``: a GGUF file whose ``tokenizer.*`` keys are copied (exact for a model
    converted from it); else ``tokenizer`` (a byte-level BPE fast tokenizer) is described;
    with neither, the file has no vocabulary (llama.cpp cannot run it, but it can be read).
    ``pre_tokenizer``: the ``tokenizer.ggml.pre`` to write for ``tokenizer`` instead of the one
    read from its own pre-tokenizer (which refuses layouts it does not recognise).
    """
    if tensor_type not in TENSOR_TYPES:
        raise UserError(f"--type {tensor_type}: choose one of {sorted(TENSOR_TYPES)}")
    from lorakit.state import state_of

    if state_of(model) is not None:
        raise UserError("the model still has lorakit adapters; merge_and_unload it first")
    config = model.config
    layout = gguf_layout(config)
    check_head_size(config)
    _refuse_rope_scaling(config)
    _refuse_other_activation(config)
    _refuse_sliding_window(config)
    _refuse_quantized_layers(model)
    tensors = model_tensors(model, layout, tensor_type)
    vocabulary = _vocabulary_keys(config, tokenizer, tokenizer_gguf, pre_tokenizer)

    def fill(writer) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(getattr(config, "_name_or_path", "") or "model").name)
        _add_hyperparameters(writer, config, layout)
        writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[tensor_type]])
        if tensor_type in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, value_type, sub_type in vocabulary:
            writer.add_key_value(key, value, value_type, sub_type)
        for tensor_name, (data, qtype) in tensors.items():
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)

    return write_gguf(output, layout.arch, fill)


def _vocabulary_keys(
    config,
    tokenizer,
    tokenizer_gguf: str | os.PathLike[str] | None,
    pre_tokenizer: str | None,
) -> list[tuple]:
    """The ``tokenizer.*`` keys to write, as ``(key, value, value_type, sub_type)``: copied
    from ``tokenizer_gguf``, else described from ``tokenizer`` (``config.vocab_size`` tokens,
    ``pre_tokenizer`` overriding the one read from it), else none. ``pre_tokenizer`` with
    ``tokenizer_gguf`` is a ``UserError`` (copied keys are exact)."""
    from lorakit.export import gguf_tokenizer

    if tokenizer_gguf is not None and pre_tokenizer is not None:
        raise UserError(
            f"pre_tokenizer {pre_tokenizer!r} (--gguf-pre) names the pre-tokenizer of a derived "
            f"tokenizer, but the tokenizer keys are copied exactly from {tokenizer_gguf}: leave "
            "it out"
        )
    if tokenizer_gguf is not None:
        return gguf_tokenizer.copied_keys(tokenizer_gguf)
    if tokenizer is not None:
        return gguf_tokenizer.tokenizer_keys(
            tokenizer, config.vocab_size, pre_tokenizer=pre_tokenizer
        )
    return []


def _refuse_rope_scaling(config) -> None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise UserError(
            f"this model uses rotary scaling {kind!r}, which lorakit's GGUF export does not "
            "write; use llama.cpp's convert_hf_to_gguf.py on the (merged) model directory"
        )


SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN names of x * sigmoid(x)


def _refuse_other_activation(config) -> None:
    """``UserError`` unless the MLP's ``hidden_act`` is SiLU: llama.cpp's llama and qwen2
    graphs compute ``down(silu(gate(x)) * up(x))`` whatever the file says."""
    activation = getattr(config, "hidden_act", "silu")
    if activation not in SILU_NAMES:
        raise UserError(
            f"this model's config has hidden_act={activation!r}; llama.cpp runs "
            f"{config.model_type} models with SiLU only, so its outputs would differ. lorakit's "
            "GGUF export does not write it: run the model with transformers or lorakit"
        )


def _refuse_sliding_window(config) -> None:
    """``UserError`` for attention through a sliding window, which llama.cpp's llama / qwen2
    graphs do not apply (every token attends to the whole context): a ``sliding_window``
    smaller than ``max_position_embeddings`` on the layers transformers applies it to, every
    layer of a Mistral (``model_type`` "mistral") or those whose ``layer_types`` entry is
    "sliding_attention" (Qwen2: transformers computes them from ``use_sliding_window`` and
    ``max_window_layers``; such layers without a window transformers cannot run). Any other
    ``sliding_window`` (transformers' Llama ignores it) does nothing, and neither does a window
    no position can exceed."""
    window = getattr(config, "sliding_window", None)
    longest = config.max_position_embeddings
    if window is not None and window >= longest:
        return
    layer_types = list(getattr(config, "layer_types", None) or [])
    sliding = [index for index, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if sliding:
        field = f"layer_types with 'sliding_attention' at layers {sliding}"
        if getattr(config, "use_sliding_window", False):
            field += f" (use_sliding_window=True, max_window_layers={config.max_window_layers})"
    elif window is not None and config.model_type == "mistral":
        field = "model_type='mistral' (a window on every layer)"
    else:
        return
    smaller = "" if window is None else f" (smaller than max_position_embeddings={longest})"
    raise UserError(
        f"this model's config has sliding_window={window}{smaller} and {field}: its attention "
        "looks back only that far, which llama.cpp's GGUF models of this architecture do not do "
        "(they attend to the whole context), so their outputs would differ. lorakit's GGUF "
        "export does not write it: run the model with transformers or lorakit"
    )


def _refuse_quantized_layers(model: nn.Module) -> None:
    """``UserError`` naming the quantized layers (``lorakit.quantized``: bitsandbytes, torchao,
    GGUF blocks, int8-rows, int4-groups, or a layer that looks quantized), each with its class
    and why, that ``model`` still holds: their ``weight`` is packed storage, not the float
    matrix a GGUF model file holds. ``merge_and_unload`` is suggested only when it can
    dequantize every one of them (a layer only ``looks_quantized`` it cannot)."""
    from lorakit import quantized

    listed, unknown = [], []
    for name, module in model.named_modules():
        cls = type(module)
        path = f"{cls.__module__}.{cls.__qualname__}"
        if quantized.is_quantized(module):
            listed.append(f"{name} ({path})")
        elif (reason := quantized.looks_quantized(module)) is not None:
            listed.append(f"{name} ({reason if path in reason else f'{path}: {reason}'})")
            unknown.append(name)
    if not listed:
        return
    shown = "; ".join(listed[:3]) + (f"; ... ({len(listed)} in all)" * (len(listed) > 3))
    advice = "load the model unquantized (no quantization)"
    if unknown:
        advice += (
            f". lorakit cannot dequantize {unknown[0]} (a layer type no lorakit backend runs), "
            "so merge_and_unload would not make it float either"
        )
    else:
        advice += (
            ", or, with an adapter on it, merge_and_unload the model (it dequantizes these "
            "layers) and export that"
        )
    raise UserError(
        f"the model holds quantized layers ({shown}); the GGUF export writes float weights: "
        + advice
    )


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hyperparameters(writer, config, layout: GgufLayout) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(layout.blocks)
    writer.add_head_count(layout.heads)
    writer.add_head_count_kv(layout.kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * layout.heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def model_tensors(model: nn.Module, layout: GgufLayout, tensor_type: str) -> dict[str, tuple]:
    """``{GGUF name: (encoded data, GGMLQuantizationType)}`` of every weight of ``model``."""
    import gguf

    name_map = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.arch), layout.blocks
    )
    tensors = {}
    head_is_embedding = layout.tied_embeddings and _head_is_embedding(model)
    for parameter_name, tensor in model.state_dict().items():
        if parameter_name == "lm_head.weight" and head_is_embedding:
            continue  # llama.cpp reads token_embd for the output when there is no output.weight
        mapped = name_map.get_type_and_name(parameter_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UserError(
                f"{parameter_name}: no GGUF tensor of architecture {layout.arch!r} holds it; "
                "the model has parts llama.cpp does not run"
            )
        gguf_name = mapped[1]
        order = layout.row_order(gguf_name, tensor.shape[0])
        if order is not None:
            tensor = tensor[order]  # llama.cpp's rotary row order (weights and biases alike)
        chosen = tensor_type
        if tensor.dim() == 1:
            chosen = "f32"
        elif tensor_type in ("q8_0", "q4_0") and tensor.shape[-1] % QUANTIZED_BLOCK:
            chosen = "f16"
        tensors[gguf_name] = encode_tensor(tensor, chosen)
    return tensors


def _head_is_embedding(model: nn.Module) -> bool:
    """Whether the output projection IS the token embedding: the same tensor, or equal values.

    ``config.tie_word_embeddings`` is not enough: merging an adapter that trained a
    ``modules_to_save`` copy of ``lm_head`` or ``embed_tokens`` unties them (the config still
    says tied), and the file must then hold the head as ``output.weight``."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None:
        return False
    head, embedding = head.weight, embedding.weight
    if head is embedding:
        return True
    return head.shape == embedding.shape and torch.equal(head.detach(), embedding.detach())
