"""Plan before you train: parameter counts and memory of a LoRA setup, without loading weights.

The model is built from its config on PyTorch's ``meta`` device (shapes only, no storage), the
adapter is put in with ``lorakit.inject`` and counted with ``lorakit.count_parameters``, so the
numbers are exactly those of a real run. The memory model (what each byte figure means, with
its formula) is ``lorakit.plan_memory``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorakit.accounting import count_parameters
from lorakit.activations import Activations, training_activations
from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.inject import inject
from lorakit.io.planned_size import adapter_header_bytes
from lorakit.layer_groups import adapted_size, layer_group
from lorakit.meta_model import BUILTIN_CONFIGS, build_meta_model
from lorakit.plan_memory import DEFAULT_SEQ_LEN, GB, MB, ModuleTypePlan, Plan
from lorakit.positions import learned_position_limit, max_positions
from lorakit.quantized.loading import kept_in_float32
from lorakit.state import lora_layers

__all__ = [
    "BUILTIN_CONFIGS",
    "DEFAULT_SEQ_LEN",
    "GB",
    "MB",
    "ModuleTypePlan",
    "Plan",
    "build_meta_model",
    "plan",
]


def plan(
    model: str,
    *,
    r: int = 16,
    lora_alpha: float | None = None,
    target_modules: str | list[str] = "all-linear",
    dtype: str | None = None,
    num_adapters: int = 1,
    devices: int = 1,
    strategy: str = "ddp",
    quantization: str | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    lora_dropout: float = 0.0,
) -> Plan:
    """Count a LoRA setup on ``model`` (built-in name, HF model directory or config.json).

    ``lora_alpha`` defaults to ``2 * r``; ``dtype`` to the dtype ``lorakit.models.load_model``
    gives a lorakit built-in model (float32), else the config's dtype (float32 if none); the
    parameters transformers keeps in float32 at that dtype stay float32 (``_keep_float32``).
    ``devices`` and ``strategy`` ("ddp" or "fsdp") give the per-device training memory;
    ``quantization`` (nf4, fp4, int8, q4_0, q4_1, q8_0, int8-rows, int4-groups) stores the base's
    linears quantized (``lorakit.quantized.footprint``; with ``strategy="fsdp"`` it is a
    ``UserError``, as ``lorakit train`` refuses that setup, and so is FSDP on one device);
    ``batch_size`` sequences of ``seq_len`` tokens (default 2048, or the model's maximum when
    shorter) per device, with LoRA dropout ``lora_dropout``, give the activations.
    """
    _check_run_shape(devices, strategy, batch_size, seq_len, num_adapters)
    meta_model, dtype_name = build_meta_model(model, dtype)
    float32_base = _keep_float32(meta_model, dtype_name)
    config = _lora_config(r, lora_alpha, target_modules, lora_dropout, _task_type(meta_model))
    base_parameters = count_parameters(meta_model).total
    quantized_weights = _quantized_weights(meta_model, quantization)
    _check_shardable(strategy, devices, quantization)
    _inject_on_meta(meta_model, config)
    counts = count_parameters(meta_model)
    header_bytes = adapter_header_bytes(
        meta_model, dataclasses.replace(config, base_model_name_or_path=model)
    )
    _check_positions(meta_model, seq_len)
    activations, activations_error = _activations(meta_model, batch_size, seq_len, lora_dropout)
    return Plan(
        model=model,
        architecture=type(meta_model).__name__,
        dtype=dtype_name,
        config=config,
        base_parameters=base_parameters,
        float32_base_parameters=float32_base,
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        module_types=_module_types(meta_model),
        num_adapters=num_adapters,
        devices=devices,
        strategy=strategy,
        quantization=quantization,
        quantized_weights=quantized_weights,
        activations=activations,
        activations_error=activations_error,
        adapter_header_bytes=header_bytes,
        trainable_in_dtype=_trainable_in_dtype(meta_model),
        block_backward_bytes=_block_backward_bytes(meta_model, activations, dtype_name),
        **_fsdp_units(meta_model),
    )


def _check_run_shape(
    devices: int, strategy: str, batch_size: int, seq_len: int | None, num_adapters: int = 1
) -> None:
    """``UserError`` (CLI option names) for devices, batch size or seq_len below 1, a strategy not
    "ddp" / "fsdp", FSDP on one device (``train.distributed.check_strategy``), adapters < 0."""
    if devices < 1 or strategy not in ("ddp", "fsdp"):
        raise UserError(
            f"--devices must be >= 1 and --strategy ddp or fsdp (got {devices}, {strategy!r})"
        )
    if strategy == "fsdp" and devices < 2:
        raise UserError(
            f"--strategy fsdp shards across processes (got --devices {devices}): give "
            "--devices 2 or more, or drop --strategy fsdp to plan one process"
        )
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise UserError(f"--batch-size and --seq-len must be >= 1 (got {batch_size}, {seq_len})")
    if num_adapters < 0:
        raise UserError(
            f"num_adapters (--adapters) must be >= 0, the adapters served beside one base "
            f"(got {num_adapters})"
        )


def _keep_float32(model: nn.Module, dtype: str) -> int:
    """Cast to float32, as ``from_pretrained(dtype=)`` loads them, the parameters the class keeps
    in float32 (``quantized.loading.kept_in_float32``: T5's ``wo`` at float16); their count."""
    kept = kept_in_float32(model, getattr(torch, dtype))
    named = [p for n, p in model.named_parameters() if kept is not None and kept.search(n)]
    for parameter in named:
        parameter.data = parameter.data.to(torch.float32)
    return sum(p.numel() for p in named)


def _inject_on_meta(meta_model: nn.Module, config: LoraConfig) -> None:
    """Inject ``config`` without dropout; a target lorakit cannot adapt is a ``UserError``."""
    try:  # dropout cannot draw on meta: its masks are counted by rule
        inject(meta_model, dataclasses.replace(config, lora_dropout=0.0))
    except (ValueError, TypeError) as error:  # TypeError: a module lorakit cannot adapt
        raise UserError(str(error)) from None


def _check_shardable(strategy: str, devices: int, quantization: str | None) -> None:
    """Refuse FSDP over a quantized base, as ``lorakit train`` does (``fsdp.check_shardable``)."""
    if strategy == "fsdp" and devices > 1 and quantization is not None:
        from lorakit.train.fsdp import quantized_base_error

        raise quantized_base_error(f"--quantization {quantization}")


_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def _task_type(model: nn.Module) -> str | None:
    """The PEFT task type (``SEQ_CLS`` for ``*ForSequenceClassification``...) where it changes
    what is trained (a new head trained in full: ``targets.saved_module_entries``); else None."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def _lora_config(
    r: int,
    lora_alpha: float | None,
    target_modules: str | list[str],
    lora_dropout: float,
    task_type: str | None = None,
) -> LoraConfig:
    """The adapter's config (``lora_alpha`` None: ``2 * r``); a bad value is a ``UserError``."""
    try:
        return LoraConfig(
            r=r,
            lora_alpha=2 * r if lora_alpha is None else lora_alpha,
            target_modules=target_modules,
            lora_dropout=lora_dropout,
            task_type=task_type,
        )
    except ValueError as error:
        raise UserError(str(error)) from None


def _check_positions(model: nn.Module, seq_len: int | None) -> None:
    """Refuse a ``seq_len`` longer than a learned absolute position table."""
    limit = learned_position_limit(model)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise UserError(
            f"--seq-len {seq_len} is longer than this {type(model).__name__}'s learned "
            f"position table ({limit} positions); use --seq-len {limit} or less"
        )


def _activations(
    model: nn.Module, batch: int, seq_len: int | None, dropout: float
) -> tuple[Activations | None, str]:
    """The activations (``seq_len`` None: ``DEFAULT_SEQ_LEN`` or the model's maximum if shorter),
    or None and why: a forward that cannot run on meta is reported, not raised."""
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_positions(model) or DEFAULT_SEQ_LEN)
    try:
        return training_activations(model, batch=batch, seq_len=seq_len, dropout=dropout), ""
    except Exception as error:  # any model code may fail on meta; the plan reports it
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return None, f"{type(error).__name__}: {first_line[:200]}"


def _trainable_in_dtype(model: nn.Module) -> int:
    """Trainable parameters not in float32: on a float16 / bfloat16 model the full-module copies
    ``modules_to_save`` trains (a classifier's head: ``save_adapter`` writes them, and torch's
    AdamW keeps their gradient and states, in that dtype); the adapter's own are float32."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable if p.dtype != torch.float32)


def _block_backward_bytes(model: nn.Module, activations: Activations | None, dtype: str) -> int:
    """``B``: the most one block's backward holds beyond what the step keeps, for N tokens::

        max(N (H + k I) b, N (H + I) 4, 5 N H 4)

    the MLP's backward, with the block output's gradient (N H b) and the gradients of its k
    (N, I) intermediates (2 for a gated MLP's gate and up, with three weights of width I, else
    1; the down projection's saved input is freed by then); on a bfloat16 base, the down
    projection's float32 adapter taking its input and output gradient in float32; or a float32
    RMSNorm's backward (transformers' upcast: five (N, H) float32 tensors, a bfloat16 Llama's
    peak). H: the config's hidden size, I: the widest dimension of a block's frozen weights
    (``saved_tensors.Blocks``, embeddings left out). A causal LM's loss backward (2 N V 4) is
    larger; a classifier's is not: this is its peak (``tests/test_plan_review35.py``)."""
    if activations is None:
        return 0
    from lorakit.saved_tensors import Blocks

    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    blocks = Blocks(model).modules
    layers = [m for block in blocks for m in block.modules() if not isinstance(m, nn.Embedding)]
    shapes = [p.shape[-2:] for m in layers for p in m.parameters(False) if not p.requires_grad]
    widest = max((max(shape) for shape in shapes if len(shape) == 2), default=0)
    gated = sum(widest in shape for shape in shapes if len(shape) == 2) >= 3 * len(blocks)
    tokens = activations.batch * activations.seq_len
    itemsize = getattr(torch, dtype).itemsize
    mlp = tokens * (hidden + (2 if gated else 1) * widest) * itemsize
    return max(mlp, tokens * (hidden + widest) * 4, 5 * tokens * hidden * 4)  # (upcast, norm)


def _quantized_weights(model: nn.Module, quantization: str | None) -> tuple[int, int]:
    """``(weights, bytes)`` of ``quantized_base``, refused as loading refuses it: no block layer
    (``loading.refuse_no_block_layer``: GPT-2's Conv1D...), a GGUF row not whole blocks."""
    if quantization is None:
        return 0, 0
    from lorakit.quantized.footprint import WEIGHT_ONLY, quantized_base
    from lorakit.quantized.loading import refuse_no_block_layer

    if quantization in WEIGHT_ONLY:
        refuse_no_block_layer(model, quantization)
    try:
        weights, stored = quantized_base(model, quantization)
    except ValueError as error:
        raise UserError(f"--quantization: {error}") from None
    if stored == 0:
        raise UserError(
            f"--quantization {quantization}: this {type(model).__name__} has no linear layer "
            "to store quantized; plan it without --quantization"
        )
    return weights, stored


def _fsdp_units(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(frozen, trainable)`` parameters of the largest transformer block and outside them."""
    from lorakit.train.fsdp import fsdp_units

    def counts(parameters) -> tuple[int, int]:
        parameters = list(parameters)
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        return sum(p.numel() for p in parameters) - trainable, trainable

    blocks = [counts(block.parameters()) for block in fsdp_units(model)]
    largest = max(blocks, key=sum, default=(0, 0))
    inside = {id(p) for block in fsdp_units(model) for p in block.parameters()}
    outside = counts(p for p in model.parameters() if id(p) not in inside)
    return {"largest_block": largest, "outside_blocks": outside}


def _module_types(model: nn.Module) -> tuple[ModuleTypePlan, ...]:
    """Group the adapted layers by ``layer_group`` (``q_proj``, a bare parameter's
    ``down_proj``...); base parameters: what each adapts (``adapted_size``)."""
    groups: dict[str, list[int]] = {}
    for name, layer in lora_layers(model):
        entry = groups.setdefault(layer_group(name, layer), [0, 0, 0])
        entry[0] += 1
        entry[1] += adapted_size(layer)
        entry[2] += sum(
            p.numel() for adapter in layer.adapter_names for p in layer.adapter_parameters(adapter)
        )
    return tuple(ModuleTypePlan(name, *numbers) for name, numbers in groups.items())
