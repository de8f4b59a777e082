"""Activation memory of LoRA training: the bytes autograd keeps from forward for backward.

``training_activations`` runs one training forward of a model built on PyTorch's ``meta``
device (shapes only, no storage; ``lorakit.plan`` builds it with its adapter) on a
``(batch, seq_len)`` batch of token ids, with labels where the model has a loss (the ids for a
causal LM, class ids for a sequence or token classifier: ``saved_tensors.loss_labels``), and
adds up every tensor autograd saves: once per storage (the normed input that q, k and v share, the rotary
tables every layer reads, an output that is the next layer's input), leaving out parameters and
buffers. It runs the model's own code and lorakit's own fused LoRA nodes, so it counts what a real
step keeps; the tests check the count to the byte against a real forward on CPU. For a Llama
block of N = batch * seq_len tokens, hidden H, MLP width I, heads n_h of width d, n_kv key/value
heads and b bytes per element (all-linear LoRA of rank r, no dropout) it comes to::

    norms       2 * N * (4 H + 4)                 input and 1/rms of both RMSNorms, float32
    LoRA inputs N * (2 H + I) * b + 7 * N * r * b  x of q/k/v, gate/up, down; each A x
    attention   N * (2 n_h d + 2 n_kv d) * b      q, k, v and the output (o_proj's input)
                + batch * n_h * seq_len * 4       flash attention's log-sum-exp, float32
    MLP         3 * N * I * b                     silu's input, its output, up's output

and once per model the final norm, the rotary tables and the loss's float32 log-softmax,
N * V * 4 bytes, which for a small model with a large vocabulary (SmolLM2: V = 49,152) is the
largest single term. The first block's input norm keeps nothing: no gradient flows into the
frozen embedding.

Two things are counted by rule, as they cannot run on ``meta`` the way they run for real:

- ``scaled_dot_product_attention``: on ``meta`` PyTorch takes its math path, which would keep the
  (batch, heads, seq_len, seq_len) probabilities; real steps take flash attention (CPU and CUDA),
  which keeps q, k, v, the output and the log-sum-exp. The count calls the CPU flash kernel's own
  meta function instead.
- LoRA dropout masks, from ``dropout``: each adapted layer keeps ``ceil(N k / 8)`` bytes of bits
  for its (N, k) input (``lorakit.fast.dropout``; on CPU at p <= 1/16 it keeps int16 steps between
  the drops instead, about ``2 p N k`` bytes, which is less).

Each saved tensor is also attributed to the transformer block (``saved_tensors.Blocks``) that saved it, and each block's input is measured, for gradient checkpointing
(``Activations.checkpointed_bytes``): a checkpointed step keeps each block's input (N * H * b
bytes) and the head's tensors through forward, then recomputes one block at a time in backward.

What is kept is not yet the peak: backward starts with the loss, whose two float32 buffers of
the logits' size, ``L = 2 N V 4`` bytes (nll_loss's gradient and the log-softmax's backward
output), are alive with everything kept (``Activations.loss_backward_bytes``). SmolLM2 at
1 x 256 tokens: 101 MB over 224 MB kept, in bfloat16; a checkpointed step's peak (160 MB) is
this one. On an int8-rows / int4-groups base backward also rebuilds each layer's weight
(``lorakit.quantized.footprint.dequantized_backward_bytes``), which
``Activations.backward_peak_bytes`` and ``checkpointed_peak_bytes`` take (``lorakit.plan_memory``
passes them); ``peak_bytes`` and ``checkpointed_bytes`` are a float base's.

Not counted here: a padding mask (sequences are taken as full; a (batch, 1, T, T) boolean mask
adds batch * T * T bytes, once) and one block's own backward buffers (its MLP's gradients, a
float32 norm's), which are smaller than ``L`` for a language model and the peak for a classifier:
``lorakit.plan`` measures them (``plan._block_backward_bytes``) and ``plan_memory.Plan``'s peaks
take them, where ``peak_bytes`` and ``checkpointed_bytes`` here do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.saved_tensors import (
    BEFORE,
    HEAD,
    FlashAttention,
    count_saved,
    input_embeddings_require_grad,
    loss_labels,
    training_mode,
)

__all__ = ["Activations", "training_activations"]


@dataclass(frozen=True)
class Activations:
    """Bytes one training step keeps for backward on a ``(batch, seq_len)`` batch.

    The ``checkpoint_*`` fields count the forward as gradient checkpointing runs it: with the
    input embeddings' output requiring grad (``lorakit train --gradient-checkpointing`` asks for
    it, so that the frozen embeddings pass gradients), which adds what the layers before the
    first block keep (BERT's embedding norm, GPT-2's dropout) and what the first block keeps of
    its input norm."""

    batch: int
    seq_len: int
    saved_bytes: int  # tensors autograd saves (parameters and buffers left out)
    dropout_mask_bytes: int  # LoRA dropout's bits, one per adapted layer's input element
    checkpoint_block_bytes: tuple[int, ...] = ()  # what each block saves, recomputed
    checkpoint_input_bytes: int = 0  # the blocks' input hidden states, together
    checkpoint_before_bytes: int = 0  # saved before the first block (kept to the end)
    checkpoint_head_bytes: int = 0  # saved after the last block (freed before blocks' backward)
    attention: str = "flash"  # "math": attention dropout > 0, CPU's path keeps the T x T weights
    loss_backward_bytes: int = 0  # L = 2 N V 4: the loss backward's two float32 buffers
    logits_bytes: int = 0  # G = N V b: the logits, and so their gradient into the output layer
    output_layer_shape: tuple[int, int] = (0, 0)  # (out, in) of the output layer, if any
    linear_shapes: tuple[tuple[int, int], ...] = ()  # the other linears a weight-only load takes

    @property
    def total_bytes(self) -> int:
        """What the forward keeps for backward: saved tensors and dropout masks."""
        return self.saved_bytes + self.dropout_mask_bytes

    @property
    def peak_bytes(self) -> int:
        """The most backward holds at once on a float base: ``total_bytes + L`` (the loss
        backward's buffers beside everything kept; ``backward_peak_bytes``)."""
        return self.backward_peak_bytes()

    @property
    def checkpointed_bytes(self) -> int | None:
        """With gradient checkpointing, the most backward holds at once on a float base
        (``checkpointed_peak_bytes``). None for a model without blocks found."""
        return self.checkpointed_peak_bytes()

    def head_backward_bytes(self, output_rebuilt: int = 0) -> int:
        """What the head's backward holds beyond what is kept, at its largest::

            max(L, R + G - L / 2)

        first the loss backward's ``L = 2 N V 4`` bytes; then the output layer's backward, after
        the log-softmax (``L / 2``) is freed, with the logits' gradient ``G = N V b`` and
        ``output_rebuilt = R`` bytes of its weight rebuilt (a weight-only base; 0 on a float
        one, where this is ``L``)."""
        after_loss = output_rebuilt + self.logits_bytes - self.loss_backward_bytes // 2
        return max(self.loss_backward_bytes, after_loss)

    def backward_peak_bytes(self, output_rebuilt: int = 0, block_rebuilt: int = 0) -> int:
        """The most one step holds at once for its activations, without checkpointing::

            total_bytes + max(head_backward_bytes(R_out), R_block)

        ``R_out`` / ``R_block``: the bytes of the output layer's / the largest other layer's
        weight rebuilt in backward (``footprint.dequantized_backward_bytes``; 0 on a float
        base). A block layer's backward comes after the head's tensors are freed: counting it
        beside all that is kept overstates it, by at most what the head keeps."""
        return self.total_bytes + max(self.head_backward_bytes(output_rebuilt), block_rebuilt)

    def checkpointed_peak_bytes(
        self, output_rebuilt: int = 0, block_rebuilt: int = 0
    ) -> int | None:
        """The most one step with gradient checkpointing holds at once for its activations::

            inputs + before + max(head + head_backward_bytes(R_out),
                                  largest block + its dropout masks + R_block)

        the blocks' inputs (what checkpointing keeps of each block) and what is saved before
        the first block (both live until the end of backward), plus the larger of the head's
        part in its backward (the loss backward's buffers, the output layer's rebuilt weight;
        freed before any block's backward) and one block recomputed in backward with that
        block's dropout masks and a rebuilt weight. None for a model without blocks found."""
        blocks = self.checkpoint_block_bytes
        if not blocks:
            return None
        largest = max(blocks) + -(-self.dropout_mask_bytes // len(blocks)) + block_rebuilt
        kept = self.checkpoint_input_bytes + self.checkpoint_before_bytes
        head = self.checkpoint_head_bytes + self.head_backward_bytes(output_rebuilt)
        return kept + max(head, largest)


def training_activations(
    model: nn.Module, *, batch: int, seq_len: int, dropout: float = 0.0
) -> Activations:
    """Count what a training forward of ``model`` (on ``meta``, LoRA dropout off) saves for
    backward on ``batch`` sequences of ``seq_len`` tokens, and again as checkpointing runs it;
    ``dropout`` > 0 adds its masks.

    Raises whatever the model's forward raises on ``meta`` (the caller reports it)."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got {batch} and {seq_len}")
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    inputs: dict[str, object] = {"input_ids": ids}
    labels = loss_labels(model, ids)
    if labels is not None:  # what the loss saves is counted too (its log-softmax, the labels)
        inputs["labels"] = labels
    with training_mode(model), FlashAttention() as attention:
        saved, _, adapted, logits = count_saved(model, inputs)
        with input_embeddings_require_grad(model):
            by_block, block_inputs, _, _ = count_saved(model, inputs)
    masks = sum(-(-elements // 8) for elements in adapted) if dropout > 0 else 0
    before, head = by_block.pop(BEFORE, 0), by_block.pop(HEAD, 0)
    blocks = tuple(by_block.get(index, 0) for index in range(len(block_inputs)))
    output_shape, linear_shapes = _linear_shapes(model)
    return Activations(
        batch,
        seq_len,
        sum(saved.values()),
        masks,
        blocks,
        sum(block_inputs),
        before,
        head,
        "math" if attention.math_calls else "flash",
        loss_backward_bytes=_loss_backward_bytes(logits) if labels is not None else 0,
        logits_bytes=0 if logits is None else logits.numel() * logits.element_size(),
        output_layer_shape=output_shape,
        linear_shapes=linear_shapes,
    )


def _loss_backward_bytes(logits: torch.Tensor | None) -> int:
    """``2 N V 4``: the two float32 buffers of the logits' size the loss backward holds at
    once beside its saved log-softmax (``nll_loss``'s gradient and ``_log_softmax_backward``'s
    output; transformers' causal-LM loss takes the logits to float32 first). A classifier's
    loss in its logits' dtype holds less: its logits are small."""
    return 0 if logits is None else 2 * logits.numel() * 4


def _linear_shapes(model: nn.Module) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """``footprint.weight_only_shapes``: the layers whose weight an int8-rows / int4-groups
    base rebuilds in backward (recorded for ``lorakit.plan_memory``)."""
    from lorakit.quantized.footprint import weight_only_shapes

    return weight_only_shapes(model)
