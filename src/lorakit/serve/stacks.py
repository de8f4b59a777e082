"""The per-layer tensors of the adapter bank, and the model side of serving.

Adapter weights live in rank-granular pages (S-LoRA's idea): for every adapted linear layer
(d x k) the bank keeps a pool of pages, each ``page_rank`` rows of A and of B^T (punica's
layout, B transposed)::

    A_pages: (pages, page_rank, k)    B_pages^T: (pages, page_rank, d)    scaling: (slots,)

A and B^T in the bank's dtype; the scalings, and every product, in ``compute_dtype``: float32,
or float64 for a float64 bank (which keeps each ``s`` as exactly as ``load_adapter`` does). A
16-bit bank (``lorakit serve --adapter-dtype bfloat16``) holds half the bytes of a float32 one
and widens the pages it reads to float32 for the product: the adapter is rounded once, when it
is written, never its arithmetic.

An adapter of rank r takes ``ceil(r / page_rank)`` pages, the same page numbers in every layer
(one page table per adapter), and a slot (its scaling, DoRA gain and page table): its A rows
[0, r) spread over its pages in order, zeros beyond r. Memory is proportional to the ranks held,
not to ``max_rank x adapters``; a batch of mixed ranks computes ``sum_pages s B_p A_p x`` over
each row's own pages, which is ``s B A x`` exactly (zero rows add nothing), so adapters of
different ranks and alphas (and ``rank_pattern`` / ``alpha_pattern`` / rsLoRA) share one pool.
A layer the adapter does not target is absent from ``present``: its pages there are never
read (nor written; a pool may even be shorter than them, ``serve/pool_sizes.py``).

A DoRA adapter (``lorakit.functional``) is a LoRA adapter with ``f B`` in its B pages plus a
gain ``f - 1`` (d,) on its rows' base output, bias excluded (``dora_gain``, by slot, allocated at
the first DoRA adapter; not counted in ``page_bytes``): ``y = base + (f - 1) (W0 x) + s (f B) A x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit import functional, quantized
from lorakit.config import LoraConfig
from lorakit.dora_norms import ZeroRowNormsError, rows_named
from lorakit.errors import AdapterFileError
from lorakit.layer_wrapping import wrap_targets
from lorakit.layers import LoraLinear, is_conv1d
from lorakit.state import lora_layers
from lorakit.target_errors import no_match_message
from lorakit.targets import find_targets

__all__ = [
    "LayerStack",
    "allocate_stack",
    "dora_slot_factors",
    "page_bytes",
    "prepare_for_serving",
    "product_dtype",
    "slot_scaling",
    "write_slot",
]


@dataclass
class LayerStack:
    """The paged adapters of one linear layer. ``present``: slots with an adapter here.

    B is held transposed, ``lora_B_t`` (pages, page_rank, d), so that the batched product
    ``low (E, L, p) @ B^T (E, p, d)`` reads contiguous rows.
    """

    name: str
    lora_A: torch.Tensor  # (pages, page_rank, k)
    lora_B_t: torch.Tensor  # (pages, page_rank, d)
    scaling: torch.Tensor  # (slots,) in compute_dtype
    present: set[int] = field(default_factory=set)
    scaling_values: dict[int, float] = field(default_factory=dict)  # the same, as Python floats
    base_layer: nn.Module | None = None  # the served layer's base (DoRA's row norms read W0)
    dora_gain: torch.Tensor | None = None  # (slots + 1, d) >= float32: f - 1; row slots: 0
    dora_slots: set[int] = field(default_factory=set)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[2]

    @property
    def out_features(self) -> int:
        return self.lora_B_t.shape[2]

    @property
    def page_rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the adapter products (and the scalings): the pools' widened to at least
        float32, so a 16-bit pool is read and widened per product."""
        return product_dtype(self.lora_A.dtype)


def product_dtype(pool_dtype: torch.dtype) -> torch.dtype:
    """float32 for pools of a 16-bit (or float32) dtype, float64 for float64 pools."""
    return torch.promote_types(pool_dtype, torch.float32)


def prepare_for_serving(model: nn.Module, target_modules: str | list[str] = "all-linear") -> int:
    """Wrap the ``target_modules`` of ``model`` in LoRA layers with no adapter (in place).

    The layers compute exactly the base output until a bank routes rows to adapters. Returns the
    number of LoRA layers the model now has. Targets are found by PEFT's matching rules
    (``find_targets``) and wrapped by the code ``inject`` uses (``wrap_targets``).
    """
    config = LoraConfig(r=1, lora_alpha=1, target_modules=target_modules)
    # not strict: the union of the adapters' lists may name modules this model lacks
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(no_match_message(model, config))
    wrap_targets(model, targets)
    model.requires_grad_(False)
    return sum(1 for _ in lora_layers(model))


def page_bytes(layer: LoraLinear, page_rank: int, dtype: torch.dtype) -> int:
    """Bytes one page takes in ``layer``'s pools: ``page_rank`` rows of A and of B^T."""
    item = torch.empty((), dtype=dtype).element_size()
    return page_rank * (layer.in_features + layer.out_features) * item


def allocate_stack(
    name: str, layer: LoraLinear, slots: int, pages: int, page_rank: int, dtype: torch.dtype
) -> LayerStack:
    """Zeroed pools of ``pages`` pages of ``page_rank`` rows in ``dtype``, and ``slots``
    scalings in ``product_dtype(dtype)``, for ``layer`` (on the device of its base, packed
    storage included)."""
    d, k, device = layer.out_features, layer.in_features, layer.base_device
    return LayerStack(
        name=name,
        lora_A=torch.zeros(pages, page_rank, k, dtype=dtype, device=device),
        lora_B_t=torch.zeros(pages, page_rank, d, dtype=dtype, device=device),
        scaling=torch.zeros(slots, dtype=product_dtype(dtype), device=device),
        base_layer=layer.base_layer,
    )


def slot_scaling(config: LoraConfig, layer_name: str, rank: int) -> float:
    """The scaling ``s`` of an adapter with ``config`` and rank ``rank`` at ``layer_name``
    (``alpha_pattern`` and rsLoRA applied). Matches the config's regexes: call it outside any
    lock the server needs (the patterns are bounded, ``lorakit.patterns``, but not free)."""
    return functional.scaling(rank, config.alpha_for(layer_name), config.use_rslora)


def dora_slot_factors(
    stack: LayerStack,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    adapter: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f B (d, r), f - 1 (d,))`` of a DoRA adapter on ``stack``'s layer, with
    ``f = m / ||W0 + s B A||_row`` (``functional.dora_row_norms``, W0 of the served model;
    a quantized W0 is dequantized for this, as the merge does). Rows where ``n = 0`` leave f
    undefined: an ``AdapterFileError`` (a client error) naming ``adapter``, the layer and rows.

    A, B and m are first rounded to the bank's dtype (a no-op for a float32 adapter in a
    float32 bank), so a 16-bit bank serves the rounded adapter's DoRA exactly but for one
    rounding: ``f B`` is rounded into the pool when written (A there is the rounded A itself;
    ``f - 1`` is kept in the gain table, >= float32). m keeps its own dtype, so that
    ``functional.dora_factor`` rounds n as the model's forward does for that m (a 16-bit m:
    n rounded to its dtype, and a new 16-bit adapter gives f = 1 exactly)."""
    lora_A, lora_B, magnitude = (
        _rounded(t, stack.lora_A.dtype) for t in (lora_A, lora_B, magnitude)
    )
    base = stack.base_layer
    if quantized.is_quantized(base):  # W0 = dequant(packed), float32 (d, k); not kept
        weight, fan_in_fan_out = quantized.dequantized_weight(base), False
    else:
        weight, fan_in_fan_out = base.weight, is_conv1d(base)
    dtype = functional.norm_dtype(weight, lora_A, lora_B)
    base_sq = functional.base_row_sq_norms(weight, fan_in_fan_out, dtype)
    try:
        norms = functional.dora_row_norms(base_sq, weight, lora_A, lora_B, scale, fan_in_fan_out)
    except ZeroRowNormsError as error:
        raise _zero_norms_error(adapter, stack.name, error) from None
    factor = functional.dora_factor(magnitude.to(norms.device), norms).to(dtype)  # (d,)
    scaled_B = (lora_B.to(norms.device, dtype) * factor[:, None]).to(lora_B.dtype)
    return scaled_B, factor - 1.0  # (factor's dtype; the gain table keeps >= float32)


def _zero_norms_error(
    adapter: str | None, layer: str, error: ZeroRowNormsError
) -> AdapterFileError:
    """The refusal to serve DoRA adapter ``adapter`` whose ``n = ||W0 + s B A||_row`` is 0 on
    ``error.rows`` of ``layer`` in this base (``dora_norms.ZeroRowNormsError``)."""
    d, k = error.shape
    who = "a DoRA adapter" if adapter is None else f"adapter {adapter!r}"
    return AdapterFileError(
        f"{who} cannot be served on this base model: it is a DoRA adapter, and on "
        f"layer {layer!r} (base weight of {d} outputs x {k} inputs) its row norms "
        f"n = ||W0 + s B A||_row are 0 on {len(error.rows)} of the {d} output rows "
        f"({rows_named(error.rows)}): W0 + s B A is all zero there (a pruned or zero-padded row "
        "of W0 that the adapter leaves at zero), so DoRA's scale f = m / n is undefined and "
        "every output through that layer would be NaN (PEFT computes NaN there). Serve it on "
        "the base it was trained on, or retrain it with that layer left out of target_modules "
        "or with use_dora=False."
    )


def _rounded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` rounded to ``dtype`` and widened back to its own dtype."""
    return tensor.to(dtype).to(tensor.dtype)


def _write_gain(stack: LayerStack, slot: int, gain: torch.Tensor | None) -> None:
    """``dora_gain[slot] = gain`` (None: a LoRA adapter or none, zeros)."""
    if gain is None:
        if stack.dora_gain is not None:
            stack.dora_gain[slot].zero_()
        stack.dora_slots.discard(slot)
        return
    if stack.dora_gain is None:
        slots, d = stack.scaling.shape[0], stack.out_features
        dtype = stack.compute_dtype  # float64 bank: float64
        stack.dora_gain = torch.zeros(slots + 1, d, dtype=dtype, device=stack.lora_A.device)
    stack.dora_gain[slot].copy_(gain)
    stack.dora_slots.add(slot)


def write_slot(
    stack: LayerStack,
    slot: int,
    pages: torch.Tensor,
    pair: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float = 0.0,
    gain: torch.Tensor | None = None,
) -> None:
    """Put ``pair = (A (r, k), B (d, r))`` with scaling ``scale`` (``slot_scaling``) into the
    adapter's ``pages`` (n,) LongTensor, n * page_rank >= r, rows in page order, zeros beyond r;
    ``pair`` None: the adapter does not adapt this layer: absent, nothing written). ``gain``: a
    DoRA adapter's ``f - 1`` (d,), with ``pair = (A, f B)`` (``dora_slot_factors``)."""
    _write_gain(stack, slot, gain if pair is not None else None)
    if pair is None:  # its pages here (if the pool holds them) are never read
        stack.scaling[slot] = 0.0
        stack.scaling_values.pop(slot, None)
        stack.present.discard(slot)
        return
    count, page_rank = pages.numel(), stack.page_rank
    rows_A = torch.zeros(count * page_rank, stack.in_features, dtype=stack.lora_A.dtype)
    rows_B_t = torch.zeros(count * page_rank, stack.out_features, dtype=stack.lora_B_t.dtype)
    lora_A, lora_B = pair
    rank = lora_A.shape[0]
    rows_A[:rank] = lora_A
    rows_B_t[:rank] = lora_B.T
    device = stack.lora_A.device
    stack.lora_A[pages.to(device)] = rows_A.view(count, page_rank, -1).to(device)
    stack.lora_B_t[pages.to(device)] = rows_B_t.view(count, page_rank, -1).to(device)
    stack.scaling[slot] = scale
    stack.scaling_values[slot] = scale
    stack.present.add(slot)
