"""Weight-only 4-bit with a scale and an offset per group of 32 inputs: llama.cpp's Q4_1 scheme,
run by torch's CPU int4 kernel. The fastest base for one-stream decoding on a CPU.

For output row i and input group g (32 consecutive inputs), with codes q in [0, 15]:

    W0[i, j] = (q[i, j] - 8) * scale[g, i] + offset[g, i]      (j in group g)

``scale`` and ``offset`` are bfloat16 (``scale = (max - min) / 15`` of the group, ``offset =
min + 8 scale``; the codes are rounded against the rounded values). Every weight is within half a
step (``scale / 2``) of its code's value: where the rounded grid ``[offset - 8 scale, offset + 7
scale]`` misses the group's min or max by more than that -- a group far from zero, whose offset's
bfloat16 rounding (up to ``|offset| 2^-9``) exceeds half a step -- the scale is widened from the
rounded offset to reach both (``widen_scales``); this never happens to the weights of ordinary
models (none of SmolLM2-135M's 3.3 million groups). Q4_1 stores ``d = scale`` and ``m = min`` in
float16; this is the same grid, kept in the form torch's kernel reads. A weight takes 0.625 bytes
(half a byte of code, 4 bytes of scale and offset a group), as in Q4_1: at one token per step a
decode reads under a sixth of float32's weight bytes (int8-rows: a quarter), and decoding is bound
by them.

Storage, in the layout of ``torch._weight_int4pack_mm_for_cpu`` (a private op, in torch 2.13):

- ``packed`` (out, in / 2) uint8: rows in blocks of 64; block b, input j, byte t (0..31) holds
  the codes of rows 64b + t (low nibble) and 64b + 32 + t (high nibble); when out is an odd
  multiple of 32, the last 32 rows are one block whose byte t (0..15) holds rows 2t and 2t + 1.
  Each block fills exactly its own rows of the tensor, so layers whose sizes are multiples of
  64 concatenate by rows (``lorakit.serve.siblings`` fuses q/k/v this way);
- ``scales_and_offsets`` (in / 32, out, 2) bfloat16.

Shapes the format takes: ``out`` and ``in`` multiples of 32 (every linear of the usual LLMs);
``quantize_linears`` leaves any other layer as it is (and those the model's class keeps in
float: T5's ``wo``), and gives the output layer int8 rows (whatever its sizes). A
torch without the kernel computes ``F.linear`` with the dequantized weight (the same W0; the
kernel rounds ``x`` and the output to bfloat16). The backward pass (an adapter trained on this
base) dequantizes: ``dL/dx = dL/dy W0``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quantized.int8_rows import Int8RowsLinear
from lorakit.quantized.weight_only import WeightOnlyLinear, replace_linears

__all__ = [
    "GROUP",
    "Int4GroupsLinear",
    "base_forward",
    "check",
    "dequantized_weight",
    "describe",
    "fits",
    "pack",
    "quantize_linears",
    "requantize",
    "shape",
    "storage",
    "unpack",
]

GROUP = 32  # inputs per scale and offset
BLOCK = 64  # rows per packing block (a last block of 32 rows when out is an odd multiple of 32)
CODE_MAX = 15
HAS_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu")


def fits(out_features: int, in_features: int) -> bool:
    """Whether a (out, in) weight takes this format: both multiples of 32."""
    return out_features % GROUP == 0 and in_features % GROUP == 0


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in [0, 15] -> the kernel's layout (out, in / 2) uint8 (module doc)."""
    out_features, in_features = codes.shape
    codes = codes.to(torch.uint8)
    full = out_features // BLOCK * BLOCK
    blocks = codes[:full].view(-1, 2, BLOCK // 2, in_features)  # (blocks, 2, 32, in)
    packed = [(blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2)]  # (blocks, in, 32)
    if full < out_features:  # a tail of 32 rows: rows 2t and 2t + 1 share byte t
        tail = codes[full:].view(BLOCK // 4, 2, in_features)  # (16, 2, in)
        packed.append((tail[:, 0] | (tail[:, 1] << 4)).T[None])  # (1, in, 16)
    return torch.cat([p.reshape(-1) for p in packed]).view(out_features, in_features // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack``: (out, in / 2) uint8 -> codes (out, in) uint8."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    full = out_features // BLOCK * BLOCK
    flat = packed.reshape(-1)
    blocks = flat[: full * in_features // 2].view(-1, in_features, BLOCK // 2)  # (b, in, 32)
    rows = [torch.stack((blocks & 15, blocks >> 4), dim=1).transpose(2, 3)]  # (b, 2, 32, in)
    if full < out_features:
        tail = flat[full * in_features // 2 :].view(in_features, BLOCK // 4)  # (in, 16)
        rows.append(torch.stack((tail & 15, tail >> 4), dim=-1).permute(1, 2, 0))  # (16, 2, in)
    return torch.cat([r.reshape(-1, in_features) for r in rows])


class Int4GroupsLinear(WeightOnlyLinear):
    """A frozen linear layer stored as 4-bit codes with a bfloat16 scale and offset per group.

    Shapes: x (..., in) -> (..., out); ``packed`` (out, in / 2) uint8; ``scales_and_offsets``
    (in / 32, out, 2) bfloat16; ``bias`` (out,) float or None.
    """

    def __init__(
        self, packed: torch.Tensor, scales_and_offsets: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        expected = (in_features // GROUP, out_features, 2)
        if (
            packed.dtype != torch.uint8
            or not fits(out_features, in_features)
            or tuple(scales_and_offsets.shape) != expected
        ):
            raise ValueError(
                f"Int4GroupsLinear needs packed uint8 codes (out, in / 2) with out and in "
                f"multiples of {GROUP}, and scales and offsets {expected}; got {packed.dtype} "
                f"{tuple(packed.shape)} and {tuple(scales_and_offsets.shape)}"
            )
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer(
            "scales_and_offsets", scales_and_offsets.to(torch.bfloat16).contiguous()
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Quantize a float ``weight`` (out, in), both multiples of 32: the scale and offset of
        each group (``group_grid``), then each weight's nearest code, clamped to [0, 15]. A
        constant group gets scale 0, codes 8 and its value rounded to bfloat16 as offset."""
        out_features, in_features = weight.shape
        if not fits(out_features, in_features):
            raise ValueError(
                f"int4-groups needs a weight whose sizes are multiples of {GROUP}; got "
                f"{tuple(weight.shape)}"
            )
        with torch.no_grad():
            groups = weight.detach().to(torch.float32).view(out_features, -1, GROUP)
            scale, offset = group_grid(groups)  # (out, in / 32) each
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
            steps = (groups - offset.float()[..., None]) / divisor[..., None] + 8
            codes = steps.round().clamp(0, CODE_MAX).view(out_features, in_features)
            scales_and_offsets = torch.stack((scale.T, offset.T), dim=-1)  # (in / 32, out, 2)
        return cls(pack(codes), scales_and_offsets, bias)

    def dequantized(self) -> torch.Tensor:
        """``W0 = (q - 8) * scale + offset`` (out, in) in float32."""
        codes = unpack(self.packed).to(torch.float32) - 8  # (out, in)
        scale, offset = self.scales_and_offsets.float().unbind(-1)  # (in / 32, out) each
        codes = codes.view(self.out_features, -1, GROUP)
        weight = codes * scale.T[..., None] + offset.T[..., None]
        return weight.view(self.out_features, self.in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int4_groups_matmul(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups"


def group_grid(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 ``(scale, offset)`` (out, in / 32) of float32 ``groups`` (out, in / 32, 32):
    ``scale = (max - min) / 15``, ``offset = min + 8 scale``, each rounded to nearest, then
    ``widen_scales`` for the groups that grid misses."""
    low, high = groups.amin(-1), groups.amax(-1)  # (out, in / 32)
    scale = ((high - low) / CODE_MAX).to(torch.bfloat16)
    offset = (low + 8 * scale.float()).to(torch.bfloat16)
    return widen_scales(low, high, scale, offset), offset


def widen_scales(
    low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """``scale`` (bfloat16), widened where the grid of the stored values misses the group's
    ``[low, high]`` by more than half a step:

        high - (offset + 7 scale) > scale / 2   or   (offset - 8 scale) - low > scale / 2

    (float64, exact for float32 extremes and bfloat16 scale and offset of ordinary
    magnitudes). There the scale becomes the least bfloat16 ``s`` with
    ``offset - 8 s <= low`` and ``offset + 7 s >= high``:

        s = max((high - offset) / 7, (offset - low) / 8), rounded up

    The offset stays as rounded, so the grid then holds ``[low, high]`` and every weight is
    within ``s / 2`` of a code (the end ``s`` is set from is the group's code 0 or 15). That
    offset is the bfloat16 nearest ``low + 8 scale``, next to the centre ``low + 8 (high -
    low) / 15`` where this ``s`` is least; the other bfloat16s lie farther from it. Both ends
    cannot always be reached: that needs an offset within about a step of that centre, and
    bfloat16s near ``offset`` are ``|offset| 2^-8`` apart. The other groups (all those of
    ordinary models: a miss over half a step needs ``|offset|`` over ~256 steps) keep their
    scale bit for bit, so the codes of an existing quantized base, and adapters' fingerprints
    of it, do not change. A constant group (scale 0) keeps it too, its value the offset rounded
    to bfloat16 as before (bfloat16's own precision, ``|value| 2^-9``, not a missed grid;
    widening it changed the codes, and so the fingerprint, of bases holding such a group:
    regression review 33).
    Shapes: ``low``, ``high`` float32 and ``scale``, ``offset`` bfloat16, all (out, in / 32)."""
    low, high = low.double(), high.double()
    s, o = scale.double(), offset.double()
    miss = torch.maximum(high - (o + 7 * s), (o - 8 * s) - low)
    missed = (miss > s / 2) & (s > 0)  # (no branch on it: a meta weight has no values)
    wide = torch.maximum((high - o) / 7, (o - low) / 8).to(torch.bfloat16)
    # the nearest bfloat16 may fall short by rounding: then the next one up reaches
    short = (o + 7 * wide.double() < high) | (o - 8 * wide.double() > low)
    wide = torch.where(short, torch.nextafter(wide, wide.new_tensor(torch.inf)), wide)
    return torch.where(missed, wide, scale)


def int4_groups_matmul(x: torch.Tensor, module: Int4GroupsLinear) -> torch.Tensor:
    """``x W0^T`` (..., out) for ``x`` (..., in), in ``x``'s dtype: the int4 kernel on bfloat16
    activations on the CPU, else ``F.linear`` on the dequantized weight.

    Paid per layer at every decode step, so in few calls: x cast to a contiguous bfloat16 (m, k)
    in one (``bfloat16()``, whose arguments torch parses faster than ``to``'s; a view only for
    x of other than 2 dims: the lean decode step passes (B, k)), the buffers read from
    ``_buffers`` (not ``nn.Module``'s attribute lookup), the output cast back (``float()`` for
    float32 x) and viewed (..., out) where x was not 2-D."""
    if not (HAS_KERNEL and x.is_cpu):
        flat = x.reshape(-1, x.shape[-1])  # (m, k)
        out = F.linear(flat, module.dequantized().to(device=x.device, dtype=x.dtype))
        return out.view(*x.shape[:-1], module.out_features)
    buffers, flat = module._buffers, x.dim() == 2
    rounded = x.bfloat16()
    if not rounded.is_contiguous():
        rounded = rounded.contiguous()
    out = torch._weight_int4pack_mm_for_cpu(
        rounded if flat else rounded.view(-1, x.shape[-1]),
        buffers["packed"],
        GROUP,
        buffers["scales_and_offsets"],
    )
    out = out.float() if x.dtype is torch.float32 else out.to(x.dtype)
    return out if flat else out.view(*x.shape[:-1], module.out_features)


def quantize_linears(model: nn.Module, keep: Collection[nn.Module] | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` (exact type) whose sizes are multiples of 32 by
    an ``Int4GroupsLinear`` of its weight, in place; returns how many. The layers in ``keep``
    (None: those the model's class keeps in float, ``weight_only.kept_in_float``: T5's
    ``wo``) stay as they are, the output layer too if it is one.

    The output layer (``model.get_output_embeddings()``, when the model has one) becomes an
    ``Int8RowsLinear`` instead, whatever its sizes (int8 rows take any shape: a vocabulary of
    50257 too), as llama.cpp's 4-bit files keep theirs at 6-8 bits: on SmolLM2-135M a 4-bit
    output layer triples the largest logit error (13% of the largest logit against 4%). A tied
    output layer gets its own copy (the embedding keeps the float weight)."""
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if getter is not None else None

    def convert(linear: nn.Linear) -> nn.Module | None:
        if linear is output:  # before the size rule: int8 rows take any shape
            return Int8RowsLinear.from_weight(linear.weight, linear.bias)
        if not fits(linear.out_features, linear.in_features):
            return None
        return Int4GroupsLinear.from_weight(linear.weight, linear.bias)

    return replace_linears(model, convert, keep)


# ----------------------------------------------------------------- the quantized-base protocol
def check(module: nn.Module) -> None:
    """Nothing to check: an ``Int4GroupsLinear`` is usable as built."""


def shape(module: Int4GroupsLinear) -> tuple[int, int]:
    return module.out_features, module.in_features


def describe(module: Int4GroupsLinear) -> str:
    return "int4-groups"


def dequantized_weight(module: Int4GroupsLinear) -> torch.Tensor:
    with torch.no_grad():
        return module.dequantized()


def base_forward(module: Int4GroupsLinear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def storage(module: Int4GroupsLinear) -> dict[str, torch.Tensor]:
    return {"packed": module.packed, "scales_and_offsets": module.scales_and_offsets}


def requantize(module: Int4GroupsLinear, weight: torch.Tensor) -> Int4GroupsLinear:
    """A new ``Int4GroupsLinear`` (same bias) of ``weight`` (out, in) quantized afresh."""
    return Int4GroupsLinear.from_weight(weight, module.bias)
