"""The counting behind ``lorakit.activations.training_activations``: one training forward on
the ``meta`` device under ``torch.autograd.graph.saved_tensors_hooks``, adding up every tensor
autograd saves once per storage (parameters and buffers left out), attributed to the transformer
block that saved it (``Blocks``, with each block's input measured) or to what runs before the
first block (``BEFORE``) or after the last (``HEAD``); with the labels a training step gives the
model (``loss_labels``), flash attention counted as real steps run it (``FlashAttention``), the
model in training mode with LoRA dropout off (``training_mode``) and, for the checkpointed count,
the input embeddings requiring grad as checkpointing makes them
(``input_embeddings_require_grad``). See ``lorakit.activations`` for what the counts mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorakit.state import lora_layers

__all__ = [
    "BEFORE",
    "HEAD",
    "Blocks",
    "FlashAttention",
    "count_saved",
    "input_embeddings_require_grad",
    "loss_labels",
    "training_mode",
]


def loss_labels(model: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """The labels a training step gives ``model`` for the ``(batch, seq_len)`` ``ids``, so that
    the count holds what its loss saves: the ids for a causal LM; for a
    ``*ForSequenceClassification`` class ids ``(batch,)`` int64 (cross-entropy keeps the
    ``(batch, num_labels)`` log-softmax and the labels), or float targets when the config's
    ``problem_type`` is regression (``(batch,)`` with one label) or multi-label ``(batch,
    num_labels)``; for a ``*ForTokenClassification`` class ids ``(batch, seq_len)``. None for
    other models (a base model without a head has no loss)."""
    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return ids
    batch = ids.shape[0]
    if name.endswith("ForTokenClassification"):
        return torch.zeros_like(ids)
    if not name.endswith("ForSequenceClassification"):
        return None
    config = model.config
    problem = config.problem_type or ("regression" if config.num_labels == 1 else None)
    if problem is None or problem == "single_label_classification":
        return torch.zeros(batch, dtype=torch.long, device=ids.device)
    dtype = next(model.parameters()).dtype  # (the logits' dtype: MSE and BCE take the same)
    shape = (
        (batch,)
        if problem == "regression" and config.num_labels == 1
        else (batch, config.num_labels)
    )
    return torch.zeros(shape, dtype=dtype, device=ids.device)


BEFORE, HEAD = "before", "head"  # what is saved outside the blocks: before the first, after


def count_saved(
    model: nn.Module, inputs: dict
) -> tuple[dict, list[int], list[int], torch.Tensor | None]:
    """One forward under the hooks: ``{block index, BEFORE or HEAD: bytes saved}``, each
    block's input bytes, the element count of each adapted layer's input, and the output's
    ``logits`` (None for a model without)."""
    skip = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    held = []  # each counted storage, so that its address stays its own while counting
    by_block: dict[int | str, int] = {}
    blocks = Blocks(model)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip and storage._cdata not in seen:
            seen.add(storage._cdata)
            held.append(storage)
            where = blocks.running
            if where is None:
                where = HEAD if blocks.started else BEFORE
            by_block[where] = by_block.get(where, 0) + storage.nbytes()
        return tensor

    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with _adapted_inputs(model) as adapted, blocks, keep:
        output = model(**inputs)
    block_inputs = [blocks.inputs.get(index, 0) for index in range(len(blocks.modules))]
    logits = getattr(output, "logits", None)
    return by_block, block_inputs, adapted, logits if isinstance(logits, torch.Tensor) else None


@contextlib.contextmanager
def input_embeddings_require_grad(model: nn.Module) -> Iterator[None]:
    """The input embeddings' output requires grad for the duration (as transformers'
    ``enable_input_require_grads`` makes it; nothing where the model has no input embeddings)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        yield
        return
    handle = embeddings.register_forward_hook(lambda _, __, output: output.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


class Blocks:
    """While entered: which block is running (whether one ran yet), and the storage bytes of each block's input hidden
    states (by block index). The blocks are what gradient checkpointing recomputes one at a time:
    transformers' ``GradientCheckpointingLayer``s (else ``train.fsdp.fsdp_units``, which for
    BERT also counts the embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        from lorakit.train.fsdp import fsdp_units

        try:  # transformers >= 4.52
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            GradientCheckpointingLayer = ()  # isinstance(m, ()) is False: fsdp_units below
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self.modules = layers or fsdp_units(model)
        self.running: int | None = None
        self.started = False  # a block has run: what is saved outside the blocks is the head's
        self.inputs: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> Blocks:
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
            self.running, self.started = index, True
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                # by block: a freed input's storage address may be a later block's input's
                self.inputs[index] = hidden.untyped_storage().nbytes()

        return hook

    def _leaving(self, *_) -> None:
        self.running = None


@contextlib.contextmanager
def training_mode(model: nn.Module) -> Iterator[None]:
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


class FlashAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on ``meta`` as the CPU flash kernel's meta function,
    so autograd saves what a real step saves (q, k, v, output, log-sum-exp). With attention
    dropout CPU takes the math path, and so does the count (``math_calls``)."""

    math_calls = 0

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
            self.math_calls += 1
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
