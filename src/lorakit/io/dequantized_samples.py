"""The dequantized weight ``W0`` of a quantized base at a fingerprint's sample positions.

A quantized base's fingerprint (``lorakit.io.quantized_fingerprint``) keeps the float32 values of
``W0`` (out, in) at ``sample_positions(out * in)``, the positions a float fingerprint samples, so
a float model that IS the dequantized file can be told from one that is not. They are computed
from the rows / blocks holding the samples only, by each backend's own arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import quantized
from lorakit.io.fingerprint import sample_positions
from lorakit.quantized import bnb as bnb_backend
from lorakit.quantized import gguf_blocks, int4_groups, int8_rows

__all__ = ["dequantized_samples"]


def dequantized_samples(base: nn.Module) -> torch.Tensor | None:
    """``W0`` (out, in) of a quantized ``base``, flattened, at ``sample_positions(out * in)``:
    float32 on the CPU, computed from the rows / blocks holding those weights only (the full
    weight for a backend without such a path: torchao) by the backend's own arithmetic, so
    bit for bit ``quantized.dequantized_weight(base)`` there (except where bitsandbytes 0.50's
    CPU ``dequantize_4bit`` misreads the block scales of rows that are not whole blocks of 64:
    the samples keep each flattened block's own scale). None for a layer whose ``W0`` cannot
    be read (a repacked bitsandbytes one)."""
    if bnb_backend.is_repacked(base):
        return None
    out_features, in_features = quantized.shape(base)
    device = next(iter(quantized.storage(base).values())).device
    positions = sample_positions(out_features * in_features).to(device)
    rows, columns = positions // in_features, positions % in_features
    backend = quantized.backend_for(base)
    if backend is gguf_blocks:
        values = _gguf_values(base, rows, columns)
    elif backend is int8_rows:
        values = base.codes[rows, columns].to(torch.float32) * base.scale[rows].to(torch.float32)
    elif backend is int4_groups:
        values = _int4_groups_values(base, rows, columns)
    elif backend is bnb_backend:
        values = _bnb_values(base, positions, rows, columns)
    else:
        values = quantized.dequantized_weight(base).reshape(-1)[positions]
    return values.detach().to(torch.float32).cpu()


def _gguf_values(base: nn.Module, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The blocks holding the samples, dequantized by ``dequantize_blocks`` (one block a row)."""
    block_bytes = gguf_blocks.block_format(base.block_type).block_bytes
    per_row = base.in_features // gguf_blocks.BLOCK_SIZE
    size = gguf_blocks.BLOCK_SIZE
    blocks = base.packed.reshape(-1, block_bytes)[rows * per_row + columns // size]  # (n, bytes)
    values = gguf_blocks.dequantize_blocks(blocks, base.block_type)  # (n, 32)
    return values[torch.arange(len(rows), device=values.device), columns % size]


def _int4_groups_values(base: nn.Module, rows: torch.Tensor, columns: torch.Tensor):
    """``(q - 8) * scale + offset`` at the samples, reading each code where ``int4_groups.pack``
    put it: in a block of 64 rows, rows r and r + 32 share a byte (low, high nibble) at
    ``block * in * 32 + column * 32 + r``; in a last block of 32 rows, rows 2t and 2t + 1 at
    ``full * in / 2 + column * 16 + t``."""
    in_features, block = base.in_features, int4_groups.BLOCK
    full = base.out_features // block * block
    within = rows % block
    half = block // 2
    in_block = rows // block * (in_features * half) + columns * half + within % half
    in_tail = full * in_features // 2 + columns * (block // 4) + (rows - full) // 2
    tail = rows >= full
    index = torch.where(tail, in_tail, in_block)
    shift = torch.where(tail, (rows - full) % 2, within // half) * 4
    codes = (base.packed.reshape(-1)[index] >> shift) & 15
    groups = columns // int4_groups.GROUP
    scale, offset = base.scales_and_offsets[groups, rows].float().unbind(-1)
    return (codes.to(torch.float32) - 8) * scale + offset


def _bnb_values(base, positions: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor):
    """bitsandbytes' own dequantization of the samples: 8-bit ``int8_vectorwise_dequant`` of
    their codes and row scales; 4-bit ``dequantize_4bit`` of the blocks holding them (the
    flattened weight in blocks of ``blocksize``, ``absmax`` dequantized as bitsandbytes does)."""
    import bitsandbytes.functional as bnb_functional

    if not bnb_backend.is_4bit(base):
        codes = base.weight.data[rows, columns].reshape(-1, 1)
        scales = quantized.storage(base)["row_scales"][rows]
        return bnb_functional.int8_vectorwise_dequant(codes, scales).reshape(-1)
    state = base.weight.quant_state
    size = state.blocksize
    blocks = positions // size
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    raw = base.weight.data.view(torch.uint8).reshape(-1)
    index = blocks[:, None] * (size // 2) + torch.arange(size // 2, device=raw.device)
    sampled = bnb_functional.QuantState(
        absmax=absmax.float()[blocks],
        shape=torch.Size([len(blocks) * size]),
        code=state.code,
        blocksize=size,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    values = bnb_functional.dequantize_4bit(raw[index].reshape(-1, 1), sampled)
    return values.reshape(-1, size)[torch.arange(len(blocks), device=raw.device), positions % size]
