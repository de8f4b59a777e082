"""``lorakit plan``'s text: a ``Plan`` (``lorakit.plan``) as the lines the command prints."""

from __future__ import annotations

import torch

from lorakit.layer_wrapping import default_adapter_dtype
from lorakit.plan_memory import GB, MB, Plan

__all__ = ["format_report"]


def _gb(n_bytes: int) -> str:
    if n_bytes < GB / 100:  # would read 0.00 GB
        return _size(n_bytes)
    return f"{n_bytes / GB:,.1f} GB" if n_bytes >= 10 * GB else f"{n_bytes / GB:,.2f} GB"


def _size(n_bytes: int) -> str:
    """A size in the unit that shows it: bytes below 1 kB, kB below 1 MB, MB below 1 GB, else
    GB."""
    if n_bytes < 1e3:
        return f"{n_bytes:,} bytes"
    if n_bytes < MB:
        return f"{n_bytes / 1e3:,.1f} kB"
    return f"{n_bytes / MB:,.1f} MB" if n_bytes < GB else f"{n_bytes / GB:,.2f} GB"


def format_report(result: Plan) -> str:
    """The plan as text: counts per module type, the PEFT line, file size and memory."""
    config = result.config
    lines = [
        f"model: {result.model} ({result.architecture}, {result.dtype}; built on the meta "
        "device, no weights loaded)",
        f"LoRA: r={config.r}, lora_alpha={config.lora_alpha:g}, "
        f"target_modules={config.target_modules!r}{_task_note(config.task_type)}",
        "",
        f"{'module type':<14}{'modules':>8}{'base params':>16}{'LoRA params':>14}",
    ]
    for group in result.module_types:
        lines.append(
            f"{group.name:<14}{group.modules:>8,}{group.base_parameters:>16,}"
            f"{group.lora_parameters:>14,}"
        )
    lines += [
        "",
        result.peft_line,
        _adapter_file_line(result),
        "",
        "training memory (weights + gradients + AdamW states; GB = 1e9 bytes)",
        f"  full fine-tuning: {result.base_parameters:,} params x 16 bytes = "
        f"{_gb(result.full_finetune_bytes)}",
        *_frozen_lines(result),
        f"      + {_trainable_terms(result)} = {_gb(result.lora_trainable_state_bytes)}",
        f"      = {_gb(result.lora_training_bytes)} "
        f"({result.full_finetune_bytes / result.lora_training_bytes:.1f}x less)",
        *_per_device_lines(result),
        *_activation_lines(result),
        f"inference memory (weights only, adapters in {result.adapter_dtype})",
        f"  merged: {_gb(result.inference_merged_bytes)}",
        f"  base + {result.num_adapters} adapter(s): {_gb(result.inference_with_adapters_bytes)}",
    ]
    return "\n".join(lines)


def _adapter_file_line(result: Plan) -> str:
    """The saved file's size as ``save_adapter`` writes it by default (the adapter in its dtype,
    float32 on a 16-bit base, float64 on a float64 one; a 16-bit model's head copy in its dtype,
    ``Plan.trainable_in_dtype``) and in bfloat16."""
    adapter_dtype = result.dtype if _adapter_in_dtype(result) else "float32"
    sizes = {k: f"{_size(n)} in {k}" for k, n in result.adapter_file_bytes.items()}
    sizes["float32"] = f"{_size(result.adapter_file_bytes['float32'])} in {adapter_dtype}"
    head = _head_in_dtype(result)
    if head and adapter_dtype != result.dtype:
        sizes["float32"] += f" (its {head:,} head parameters in {result.dtype})"
    return "adapter file: " + ", ".join(sizes.values())


def _adapter_in_dtype(result: Plan) -> bool:
    """Whether the LoRA parameters are kept in the base dtype (not float32), as ``inject`` keeps
    them on the meta model: ``layer_wrapping.default_adapter_dtype`` (a float64 base)."""
    dtype = getattr(torch, result.dtype)
    return dtype != torch.float32 and default_adapter_dtype(dtype) == dtype


def _head_in_dtype(result: Plan) -> int:
    """Of ``trainable_in_dtype``, the full-module copies ``modules_to_save`` trains (a
    classifier's head), the LoRA parameters (counted per module type) left out."""
    lora = sum(group.lora_parameters for group in result.module_types)
    return result.trainable_in_dtype - (lora if _adapter_in_dtype(result) else 0)


def _trainable_terms(result: Plan) -> str:
    """``P x 16 bytes``, and the parameters trained in the base dtype (weight, gradient and
    AdamW's two states in it: ``Plan.lora_trainable_state_bytes``): a 16-bit model's head copy,
    or on a float64 base every trainable parameter."""
    in_dtype = result.trainable_in_dtype
    terms = []
    if result.trainable_parameters - in_dtype or not in_dtype:
        terms.append(f"{result.trainable_parameters - in_dtype:,} trainable x 16 bytes")
    if in_dtype:
        what = "" if terms else " trainable"  # (a 16-bit model's head copy beside the adapter)
        terms.append(f"{in_dtype:,}{what} in {result.dtype} x {4 * result.dtype_bytes} bytes")
    return " + ".join(terms)


def _frozen_lines(result: Plan) -> list[str]:
    """The frozen base's bytes: in ``dtype`` (those transformers keeps in float32 in float32,
    ``Plan.float32_base_parameters``), or its linears quantized and the rest so."""
    weights, quantized_bytes = result.quantized_weights
    kept = result.float32_base_parameters
    rest = result.frozen_parameters - weights - kept
    terms = f"{rest:,} frozen x {result.dtype_bytes} bytes ({result.dtype})"
    if kept:
        terms += f" + {kept:,} kept in float32 x 4 bytes"
    rest_bytes = rest * result.dtype_bytes + kept * 4
    if result.quantization is None:
        return [f"  LoRA: {terms} = {_gb(rest_bytes)}"]
    return [
        _quantized_line(result.quantization, weights, quantized_bytes),
        f"      + {terms} = {_gb(rest_bytes)}",
    ]


def _quantized_line(quantization: str, weights: int, quantized_bytes: int) -> str:
    """The quantized layers' bytes; with no weight replaced (GPT-2 under int8-rows or
    int4-groups: only its tied output layer is stored quantized) the added int8-rows copy."""
    if weights == 0:
        return (
            f"  LoRA: the tied output layer's int8-rows copy (the embeddings keep their float "
            f"weight; nothing else is stored quantized) = {_gb(quantized_bytes)}"
        )
    included = "scales"
    if quantization in ("int8-rows", "int4-groups"):
        included = "scales and the output layer's int8 rows"  # a copy when tied
    return (
        f"  LoRA: {weights:,} frozen in {quantization} ({quantized_bytes / weights:.4f} "
        f"bytes each, {included} included) = {_gb(quantized_bytes)}"
    )


def _task_note(task_type: str | None) -> str:
    """For a classifier or a question-answering model: PEFT's task type, whose head is trained
    in full (``targets.TASK_HEADS``)."""
    if task_type not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        return ""
    head = "question-answering head" if task_type == "QUESTION_ANS" else "classification head"
    return f", task_type='{task_type}' (the {head} trained in full)"


def _activation_lines(result: Plan) -> list[str]:
    """One batch's activations and the training total with them (per device)."""
    activations = result.activations
    if activations is None:
        return [
            "  activations: not counted; this model's forward does not run on the meta device "
            f"({result.activations_error})"
        ]
    dropout = f", dropout masks {_gb(activations.dropout_mask_bytes)}" * (
        result.config.lora_dropout > 0
    )
    where = " per device" if result.devices > 1 else ""
    attention = "flash attention"
    if activations.attention == "math":  # (a GPU's flash kernel takes dropout, and keeps less)
        attention = "attention dropout: CPU's math attention keeps the T x T weights"
    lines = [
        f"  activations kept for backward ({activations.batch} x {activations.seq_len} tokens"
        f"{where}, {attention}{dropout}): {_gb(activations.total_bytes)}",
        *_peak_lines(result),
        f"      training with activations{where}: {_gb(result.training_with_activations_bytes)}",
    ]
    checkpointed = result.checkpointed_peak_bytes
    if checkpointed is not None:
        blocks = len(activations.checkpoint_block_bytes)
        before = activations.checkpoint_before_bytes
        before = f" + {_gb(before)} before the first block" if before else ""
        lines += [
            f"  with gradient checkpointing: {_gb(checkpointed)} ({blocks} blocks' inputs "
            f"{_gb(activations.checkpoint_input_bytes)}{before} + one block recomputed or "
            "the head)",
            f"      training with them{where}: {_gb(result.training_with_checkpointing_bytes)}",
        ]
        if checkpointed >= result.activations_peak_bytes:
            lines.append(
                "      (no saving: checkpointing makes the input embeddings' output require "
                "grad, and the adapted layers keep little inside the blocks)"
            )
    return lines


def _peak_lines(result: Plan) -> list[str]:
    """What backward holds beyond what is kept, at its peak (``Plan.activations_peak_bytes``):
    ``max(L, R_out + G - L / 2, R_block, B)`` (``lorakit.plan_memory``). The line names the
    term that is the number, with its parts, and on a weight-only base (int8-rows /
    int4-groups) the other terms it is larger than."""
    activations = result.activations
    extra = result.activations_peak_bytes - activations.total_bytes
    if extra <= 0:
        return []
    terms = _peak_terms(result)
    if not terms:
        return []
    chosen = max(terms, key=lambda term: term[1])[0]  # (its bytes are ``extra``)
    others = [f"{what.split(':')[0]} {_size(size)}" for what, size in terms if what != chosen]
    weight_only = any(result.dequantized_backward_bytes)  # (a float base: one term matters)
    larger = f"; more than {', or '.join(others)}" if others and weight_only else ""
    return [f"      + at backward's peak: {_gb(extra)} ({chosen}{larger})"]


def _peak_terms(result: Plan) -> list[tuple[str, int]]:
    """``(what, bytes)`` of each term of backward's peak that is there: ``L`` (the loss
    backward's float32 buffers), ``R_out + G - L / 2`` (the output layer's backward on a
    weight-only base: its weight rebuilt, the logits' gradient, the log-softmax freed),
    ``R_block`` (the largest other layer rebuilt) and ``B`` (a block's own buffers). A model
    without an output layer (no logits: ``LlamaModel``, ``BertModel``) has no ``R_out + G``."""
    activations, quantization = result.activations, result.quantization
    loss = activations.loss_backward_bytes
    rebuilt_output, rebuilt_block = result.dequantized_backward_bytes
    terms = []
    if loss:
        terms.append(("the loss backward's float32 buffers", loss))
    if rebuilt_output or (not loss and activations.logits_bytes):  # (no labels: the logits'
        # gradient; a model without an output layer, LlamaModel / BertModel, has no such term)
        gradient = activations.logits_bytes
        size = rebuilt_output + gradient - loss // 2
        what = "the output layer's backward: the logits' gradient"
        if rebuilt_output:
            what = (
                f"the output layer's backward: the {quantization} output layer rebuilt in "
                f"float32 {_size(rebuilt_output)} + the logits' gradient {_size(gradient)}"
            )
        terms.append((what + f" - the log-softmax freed {_size(loss // 2)}" * bool(loss), size))
    if rebuilt_block:
        what = f"the largest other layer's {quantization} weight rebuilt in float32"
        terms.append((what, rebuilt_block))
    if result.block_backward_bytes:
        what = "one block's backward buffers: its MLP's gradients, or a float32 norm's"
        terms.append((what, result.block_backward_bytes))
    return terms


def _per_device_lines(result: Plan) -> list[str]:
    """The per-device training memory on ``result.devices`` devices (none for one device)."""
    devices, strategy = result.devices, result.strategy
    if devices == 1 and strategy == "ddp":
        return []
    if strategy == "ddp":
        return [
            f"  per device ({devices} devices, DDP: each holds everything): "
            f"{_gb(result.per_device_training_bytes)}"
        ]
    return [
        f"  per device ({devices} devices, FSDP): {_gb(result.lora_training_bytes)} / {devices} "
        f"= {_gb(result.fsdp_sharded_bytes)}",
        f"      + gathered while computing (outside the blocks + 2 blocks) "
        f"{_gb(result.fsdp_gathered_bytes)} = {_gb(result.per_device_training_bytes)}",
    ]
