"""The memory model of ``lorakit plan``: a ``Plan``'s counts and what each byte figure means.

``lorakit.plan.plan`` counts a model built on the meta device (exactly a real run's numbers);
a ``Plan`` holds the counts and derives the bytes (GB = 1e9 bytes; the P_32 base parameters that
transformers keeps in float32, T5's ``wo`` at float16, add P_32 (4 - b_dtype) to the base's)::

    full fine-tuning  = P_base * 16 bytes            (fp32 weight + gradient + AdamW m and v)
    LoRA training     = P_frozen * b_dtype + (P_trainable - P_d) * 16 + P_d * 4 * b_dtype
                        (P_d: trained in the base dtype, a bfloat16 model's modules_to_save copy)
    adapter file      = (P_trainable - P_d) * 4 + P_d * b_dtype (float32, as saved by default)
                        or P_trainable * 2 (bfloat16) + its header (the safetensors JSON: per
                        tensor its key, dtype, shape and offsets; the config; the base
                        fingerprint: ~760 bytes a module in all, ``io.planned_size``)
    inference merged  = P_base * b_dtype (+ P_32 * (4 - b_dtype), as every base term)
    base + N adapters = P_base * b_dtype + N * P_trainable * b_adapter
                        (b_adapter: ``layer_wrapping.default_adapter_dtype``, float32 on a float16 or
                        bfloat16 base, as ``inject``, ``load_adapter`` and the serving bank keep them)
    activations       = what a training forward of batch x seq_len tokens keeps for backward,
                        counted on the meta device (``lorakit.activations``)
    training with activations
                      = LoRA training (per device) + activations at backward's peak:
                        kept + max(L, R_out + G - L / 2, R_block, B)
                        (L = 2 N V 4: the loss backward's float32 buffers; G = N V b: the logits'
                        gradient; R_out / R_block: the output layer's / largest other layer's
                        weight rebuilt in backward on int8-rows / int4-groups, 6 V H for the
                        output layer in int8 rows under bfloat16; ``Activations.backward_peak_bytes``;
                        B: a block's own backward buffers, ``plan._block_backward_bytes``)
    with gradient checkpointing
                      = LoRA training + inputs + before
                        + max(head + max(L, R_out + G - L / 2), largest block + max(R_block, B))
                        (``Activations.checkpointed_peak_bytes``)

Per device when training on N devices (``lorakit train --strategy ddp|fsdp`` under torchrun)::

    DDP   = LoRA training                       (every device holds everything)
    FSDP  = ceil(LoRA training / N)             (each device 1/N of base and adapter state)
          + bytes(outside blocks) + 2 * bytes(largest block)

The FSDP term on the second line is what is gathered whole while computing (``lorakit.train.fsdp``):
the parameters outside the transformer blocks (embeddings, head, final norm: FSDP's root unit,
kept gathered from forward to backward) and the block being computed plus the next one
(prefetched); bytes(unit) = frozen * b_dtype + trainable * 4.

For Llama-2-7B (float16) with r=16 on all seven projections: P_base = 6,738,415,616, so full
fine-tuning needs 107.8 GB of trainable state (rounding P_base to 7B gives the ~112 GB often quoted), the frozen
float16 base 13.5 GB (~14 GB) and the 39,976,960 adapter parameters 0.64 GB.
SmolLM2-135M in int8-rows, bfloat16, 1 x 64 tokens: 55.9 MB kept for backward, and the output
layer (49,152 x 576) rebuilt in backward beside it, 6 V H = 170 MB: 219.5 MB at the peak, as a
real CPU step measures it (``tests/test_plan_peaks33.py`` checks tiny models the same way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.accounting import ParameterCount
from lorakit.activations import Activations
from lorakit.config import LoraConfig
from lorakit.layer_wrapping import default_adapter_dtype

__all__ = [
    "DEFAULT_SEQ_LEN",
    "FULL_FINETUNE_BYTES_PER_PARAMETER",
    "GB",
    "MB",
    "ModuleTypePlan",
    "Plan",
]

FULL_FINETUNE_BYTES_PER_PARAMETER = 16  # fp32 weight 4 + gradient 4 + AdamW first 4 + second 4
GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class ModuleTypePlan:
    """The adapted modules sharing one name (e.g. every ``q_proj``)."""

    name: str
    modules: int
    base_parameters: int
    lora_parameters: int


_DERIVED = (
    *("dtype_bytes", "adapter_dtype", "base_bytes", "float32_extra_bytes", "frozen_parameters"),
    *("trainable_percent", "peft_line", "adapter_file_bytes"),
    *("full_finetune_bytes", "lora_frozen_bytes", "lora_trainable_state_bytes"),
    *("lora_training_bytes", "inference_merged_bytes", "inference_with_adapters_bytes"),
    *("fsdp_sharded_bytes", "fsdp_gathered_bytes", "per_device_training_bytes"),
    *("dequantized_backward_bytes", "activations_peak_bytes", "checkpointed_peak_bytes"),
    *("training_with_activations_bytes", "training_with_checkpointing_bytes"),
)
DEFAULT_SEQ_LEN = 2048  # or the model's max_position_embeddings when shorter


@dataclass(frozen=True)
class Plan:
    """Parameter counts of a model with one LoRA adapter, and the memory they imply (bytes)."""

    model: str
    architecture: str
    dtype: str
    config: LoraConfig
    base_parameters: int
    trainable_parameters: int
    total_parameters: int
    module_types: tuple[ModuleTypePlan, ...]
    num_adapters: int = 1
    devices: int = 1
    strategy: str = "ddp"
    largest_block: tuple[int, int] = (0, 0)  # (frozen, trainable) parameters of one FSDP unit
    outside_blocks: tuple[int, int] = (0, 0)  # (frozen, trainable) of the root unit
    quantization: str | None = None  # the frozen base's linears (lorakit.quantized.footprint)
    quantized_weights: tuple[int, int] = (0, 0)  # (weights, bytes) stored quantized
    activations: Activations | None = None  # per device; None: see activations_error
    activations_error: str = ""
    adapter_header_bytes: tuple[int, int] = (0, 0)  # the file's header in float32, bfloat16
    trainable_in_dtype: int = 0  # P_d: trainable parameters held in ``dtype``, not float32
    block_backward_bytes: int = 0  # B: one block's backward buffers beyond what it keeps
    float32_base_parameters: int = 0  # P_32: base parameters kept in float32 at ``dtype``

    @property
    def dtype_bytes(self) -> int:
        return getattr(torch, self.dtype).itemsize

    @property
    def frozen_parameters(self) -> int:
        return self.total_parameters - self.trainable_parameters

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / self.total_parameters

    @property
    def peft_line(self) -> str:
        """PEFT's ``print_trainable_parameters`` line."""
        return str(ParameterCount(self.trainable_parameters, self.total_parameters))

    @property
    def adapter_file_bytes(self) -> dict[str, int]:
        """Bytes of the saved adapter file, tensors and ``adapter_header_bytes``: "float32" as
        ``save_adapter`` writes it by default (the adapter in float32, ``trainable_in_dtype``
        parameters such as a bfloat16 model's head copy in ``dtype``), "bfloat16" all bfloat16."""
        header_float32, header_bfloat16 = self.adapter_header_bytes
        tensors = self.trainable_parameters * 4 - self.trainable_in_dtype * (4 - self.dtype_bytes)
        return {
            "float32": tensors + header_float32,
            "bfloat16": self.trainable_parameters * 2 + header_bfloat16,
        }

    @property
    def full_finetune_bytes(self) -> int:
        return self.base_parameters * FULL_FINETUNE_BYTES_PER_PARAMETER

    @property
    def float32_extra_bytes(self) -> int:
        """``P_32 (4 - b_dtype)``: what the parameters kept in float32 add to ``dtype``'s bytes."""
        return self.float32_base_parameters * (4 - self.dtype_bytes)

    @property
    def base_bytes(self) -> int:
        """The frozen base: its quantized linears' bytes, P_32 in float32, the rest in ``dtype``."""
        weights, quantized_bytes = self.quantized_weights
        return self.inference_merged_bytes - weights * self.dtype_bytes + quantized_bytes

    @property
    def lora_frozen_bytes(self) -> int:
        return self.base_bytes + (self.frozen_parameters - self.base_parameters) * self.dtype_bytes

    @property
    def lora_trainable_state_bytes(self) -> int:
        """Weight, gradient and AdamW m and v of each trainable parameter in its dtype: float32
        (16 bytes), ``dtype`` for ``trainable_in_dtype`` (torch's AdamW keeps their states so)."""
        in_dtype = self.trainable_in_dtype
        in_float32 = (self.trainable_parameters - in_dtype) * FULL_FINETUNE_BYTES_PER_PARAMETER
        return in_float32 + in_dtype * 4 * self.dtype_bytes

    @property
    def lora_training_bytes(self) -> int:
        return self.lora_frozen_bytes + self.lora_trainable_state_bytes

    @property
    def inference_merged_bytes(self) -> int:
        return self.base_parameters * self.dtype_bytes + self.float32_extra_bytes

    @property
    def adapter_dtype(self) -> str:
        """The dtype loaded adapters are kept in: float32 on a quantized base, else
        ``layer_wrapping.default_adapter_dtype`` of ``dtype`` (float32 on a float16 or bfloat16 base)."""
        if self.quantization:
            return "float32"
        return str(default_adapter_dtype(getattr(torch, self.dtype))).removeprefix("torch.")

    @property
    def inference_with_adapters_bytes(self) -> int:
        """``base_bytes + num_adapters * P_trainable * bytes(adapter_dtype)``."""
        adapter_bytes = self.trainable_parameters * getattr(torch, self.adapter_dtype).itemsize
        return self.base_bytes + self.num_adapters * adapter_bytes

    def unit_bytes(self, frozen: int, trainable: int) -> int:
        """Bytes of an FSDP unit gathered whole: frozen in ``dtype``, the adapter in float32."""
        return frozen * self.dtype_bytes + trainable * 4

    @property
    def fsdp_sharded_bytes(self) -> int:
        """One device's piece of the frozen base and the adapter's weights, gradients, AdamW."""
        return -(-self.lora_training_bytes // self.devices)

    @property
    def fsdp_gathered_bytes(self) -> int:
        """Gathered while computing: the root unit, the block computed and the next one."""
        return self.unit_bytes(*self.outside_blocks) + 2 * self.unit_bytes(*self.largest_block)

    @property
    def per_device_training_bytes(self) -> int:
        """Weights, gradients and AdamW states one device holds under ``strategy``."""
        if self.strategy == "fsdp":
            return self.fsdp_sharded_bytes + self.fsdp_gathered_bytes
        return self.lora_training_bytes

    @property
    def dequantized_backward_bytes(self) -> tuple[int, int]:
        """``(R_out, R_block)``: the bytes backward holds while it rebuilds the output layer's
        weight, and the largest other layer's, on an int8-rows / int4-groups base
        (``footprint.dequantized_backward_bytes``, the gradient in ``dtype``); ``(0, 0)`` for
        any other base (a float one reads its weight as it is)."""
        if self.activations is None or self.quantization is None:
            return 0, 0
        from lorakit.quantized.footprint import dequantized_backward_bytes

        def rebuilt(shape: tuple[int, int], output: bool) -> int:
            return dequantized_backward_bytes(
                self.quantization, *shape, self.dtype_bytes, output=output
            )

        shapes = self.activations.linear_shapes
        return (
            rebuilt(self.activations.output_layer_shape, True),
            max((rebuilt(shape, False) for shape in shapes), default=0),
        )

    @property
    def backward_extra_bytes(self) -> tuple[int, int]:
        """``(R_out, max(R_block, B))``: the output layer's rebuilt weight, and a block's
        largest rebuilt weight or its backward buffers (``block_backward_bytes``), the larger."""
        output_rebuilt, block_rebuilt = self.dequantized_backward_bytes
        return output_rebuilt, max(block_rebuilt, self.block_backward_bytes)

    @property
    def activations_peak_bytes(self) -> int | None:
        """Per device: the most one step holds at once for its activations, kept and in
        backward (``Activations.backward_peak_bytes`` with ``backward_extra_bytes``)."""
        if self.activations is None:
            return None
        return self.activations.backward_peak_bytes(*self.backward_extra_bytes)

    @property
    def checkpointed_peak_bytes(self) -> int | None:
        """``activations_peak_bytes`` with gradient checkpointing
        (``Activations.checkpointed_peak_bytes``); None where no blocks were found."""
        if self.activations is None:
            return None
        return self.activations.checkpointed_peak_bytes(*self.backward_extra_bytes)

    @property
    def training_with_activations_bytes(self) -> int | None:
        """Per device: weights, gradients, AdamW states and one batch's activations at
        backward's peak (``activations_peak_bytes``)."""
        if self.activations is None:
            return None
        return self.per_device_training_bytes + self.activations_peak_bytes

    @property
    def training_with_checkpointing_bytes(self) -> int | None:
        """``training_with_activations_bytes`` with gradient checkpointing."""
        checkpointed = self.checkpointed_peak_bytes
        return None if checkpointed is None else self.per_device_training_bytes + checkpointed

    def to_dict(self) -> dict[str, Any]:
        """Every count and byte figure, JSON-ready."""
        counts = dataclasses.asdict(self)
        counts["config"] = {
            "r": self.config.r,
            "lora_alpha": self.config.lora_alpha,
            "target_modules": self.config.target_modules,
            "lora_dropout": self.config.lora_dropout,
            "task_type": self.config.task_type,
        }
        for name in _DERIVED:
            counts[name] = getattr(self, name)
        if self.activations is not None:
            for name in ("total_bytes", "peak_bytes", "checkpointed_bytes"):
                counts["activations"][name] = getattr(self.activations, name)
        return counts
