"""Activation memory of LoRA training: the bytes autograd keeps from forward for backward.

``training_activations`` runs one training forward of a model built on PyTorch's ``meta``
device (shapes only, no storage; ``lorakit.plan`` builds it with its adapter) on a
``(batch, seq_len)`` batch of token ids, the ids as labels for a causal LM, and adds up every
tensor autograd saves: once per storage (the normed input that q, k and v share, the rotary
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

Each saved tensor is also attributed to the transformer block (``train.fsdp.fsdp_units``) that
saved it, and each block's input is measured, for gradient checkpointing
(``Activations.checkpointed_bytes``): a checkpointed step keeps each block's input (N * H * b
bytes) and the head's tensors through forward, then recomputes one block at a time in backward.

Not counted: a padding mask (sequences are taken as full; a (batch, 1, T, T) boolean mask adds
batch * T * T bytes, once) and the short-lived buffers of backward (the logits' gradient,
N * V * 4 bytes, lives while the head's backward runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorakit.state import lora_layers

__all__ = ["Activations", "training_activations"]


@dataclass(frozen=True)
class Activations:
    """Bytes one training step keeps for backward on a ``(batch, seq_len)`` batch."""

    batch: int
    seq_len: int
    saved_bytes: int  # tensors autograd saves (parameters and buffers left out)
    dropout_mask_bytes: int  # LoRA dropout's bits, one per adapted layer's input element
    block_bytes: tuple[int, ...] = ()  # of saved_bytes, each transformer block's, in order
    block_input_bytes: int = 0  # the blocks' input hidden states, together

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.dropout_mask_bytes

    @property
    def outside_bytes(self) -> int:
        """Saved outside the blocks: the final norm and the loss (and what precedes block 0)."""
        return self.saved_bytes - sum(self.block_bytes)

    @property
    def checkpointed_bytes(self) -> int | None:
        """With gradient checkpointing (``lorakit train --gradient-checkpointing``): at most,
        the blocks' inputs (what checkpointing keeps of each block) plus the larger of what
        the head keeps (freed before any block's backward) and one block recomputed in backward,
        with that block's dropout masks. None for a model without blocks found."""
        if not self.block_bytes:
            return None
        block_masks = -(-self.dropout_mask_bytes // len(self.block_bytes))
        largest = max(self.block_bytes) + block_masks
        return self.block_input_bytes + max(self.outside_bytes, largest)


def training_activations(
    model: nn.Module, *, batch: int, seq_len: int, dropout: float = 0.0
) -> Activations:
    """Count what a training forward of ``model`` (on ``meta``, LoRA dropout off) saves for
    backward on ``batch`` sequences of ``seq_len`` tokens; ``dropout`` > 0 adds its masks.

    Raises whatever the model's forward raises on ``meta`` (the caller reports it)."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got {batch} and {seq_len}")
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    inputs: dict[str, object] = {"input_ids": ids}
    if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        inputs["labels"] = ids  # the loss's log-softmax is saved too
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, tuple[int, int | None]] = {}  # storage: (bytes, the block that saved it)
    held = []  # each counted storage, so that its address stays its own while counting
    blocks = _Blocks(model)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip and storage._cdata not in saved:
            saved[storage._cdata] = (storage.nbytes(), blocks.running)
            held.append(storage)
        return tensor

    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with _training(model), _FlashAttention(), _adapted_inputs(model) as adapted, blocks, keep:
        model(**inputs)
    masks = sum(-(-elements // 8) for elements in adapted) if dropout > 0 else 0
    per_block = [0] * len(blocks.modules)
    for size, block in saved.values():
        if block is not None:
            per_block[block] += size
    total = sum(size for size, _ in saved.values())
    return Activations(batch, seq_len, total, masks, tuple(per_block), sum(blocks.inputs.values()))


class _Blocks:
    """While entered: which transformer block (``train.fsdp.fsdp_units``) is running, and the
    storage bytes of each block's input hidden states (by block index)."""

    def __init__(self, model: nn.Module) -> None:
        from lorakit.train.fsdp import fsdp_units

        self.modules = fsdp_units(model)
        self.running: int | None = None
        self.inputs: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> _Blocks:
        for index, block in enumerate(self.modules):
            self._handles += [
                block.register_forward_pre_hook(self._entering(index), with_kwargs=True),
                block.register_forward_hook(self._leaving, always_call=True),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _entering(self, index: int):
        def hook(_, args, kwargs):
            self.running = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                # by block: a freed input's storage address may be a later block's input's
                self.inputs[index] = hidden.untyped_storage().nbytes()

        return hook

    def _leaving(self, *_) -> None:
        self.running = None


@contextlib.contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    """``model.train()`` for the duration, then each module's own mode back."""
    modes = {module: module.training for module in model.modules()}
    model.train()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextlib.contextmanager
def _adapted_inputs(model: nn.Module) -> Iterator[list[int]]:
    """The element count of each input an adapted (non-embedding) layer receives."""
    counts: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda _, args: counts.append(args[0].numel()))
        for _, layer in lora_layers(model)
        if not isinstance(layer.base_layer, nn.Embedding)
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


class _FlashAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on ``meta`` as the CPU flash kernel's meta function,
    so autograd saves what a real step saves (q, k, v, output, log-sum-exp)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or args[0].device.type != "meta":
            return func(*args, **kwargs)
        query, key, value = args[:3]
        options = dict(
            zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:], strict=False)
        )
        options.update(kwargs)
        if options.get("dropout_p", 0.0) > 0:  # CPU takes the math path too (saves the weights)
            return func(*args, **kwargs)
        output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query,
            key,
            value,
            options.get("dropout_p", 0.0),
            options.get("is_causal", False),
            attn_mask=options.get("attn_mask"),
            scale=options.get("scale"),
        )
        return output
