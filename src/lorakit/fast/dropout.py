"""Dropout masks drawn cheaply from a seed and kept as bits: 1/8 byte per element.

A mask for ``n`` elements is drawn as ``ceil(n / 4)`` 64-bit random words from a private
``torch.Generator`` seeded with ``seed``; each word gives four 16-bit lanes, and an element is
kept when its lane is at least ``drop_levels - 32768``. So each element is dropped independently
with probability ``drop_levels / 65536``: the requested ``p`` rounded to a multiple of 1/65536
(|error| <= 7.7e-6), and the rescale uses that same probability, so the branch is unbiased.
Drawing 16 random bits per element costs about a seventh of ``torch.bernoulli`` on CPU.

For the backward pass the mask is packed into bits (``pack_mask``: one multiply per 8 elements)
and unpacked with a 256-entry table (``unpack_mask``): about a fifth of the cost of drawing it
again, for ``n / 8`` bytes per adapted layer instead of PEFT's full-size dropped copy of the
input (``n`` elements of the activation dtype).

Small drop probabilities on CPU (``p <= 1/8``: LoRA's usual 0.05 and 0.1) are drawn the other way
round (``dropped_positions``): where the drops are, as gaps between them. The gaps of an
independent Bernoulli(p) sequence are independent geometric variables, so drawing ``p n (1 + e)``
of them (``floor(log(1 - U) / log(1 - p))`` kept elements before each drop, U uniform) gives
the same distribution as a draw per element, for a twentieth of the random numbers
at p = 0.05. For backward the steps between the drops are kept as int16 (2 p n bytes, less
than the n / 8 bytes of bits for p <= 1/16), or, outside ``KEPT_GAP_LEVELS``, nothing: the
positions are drawn again from the seed. The fused nodes apply either form through ``InputMask``:
``kept(x)`` (x with its dropped elements zeroed, fresh) and ``zero_dropped_(t)`` (in place).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DROPOUT_LEVELS",
    "SPARSE_LEVELS",
    "DenseMask",
    "InputMask",
    "SparseMask",
    "draws_positions",
    "drop_levels",
    "drop_probability",
    "dropped_positions",
    "input_mask",
    "keep_mask",
    "multiplier",
    "new_seed",
    "pack_mask",
    "restored_mask",
    "unpack_mask",
]

DROPOUT_LEVELS = 1 << 16  # resolution of the drop probability: 1 / 65536
SPARSE_LEVELS = DROPOUT_LEVELS // 8  # up to p = 1/8 (CPU): draw the drops' positions
# From p = 2^-10 to 1/16 the steps between drops fit int16 (the longest that a float32 uniform
# gives, 1 + 16.7 / -log(1 - p), is under 17,100) and take about 2 p n bytes, at most the n / 8
# of bits: they are kept for backward; elsewhere the positions are drawn again from the seed.
KEPT_GAP_LEVELS = (DROPOUT_LEVELS >> 10, DROPOUT_LEVELS // 16)


def drop_levels(p: float) -> int:
    """``round(p * 65536)``: the drop probability in units of 1/65536."""
    return round(p * DROPOUT_LEVELS)


def drop_probability(levels: int) -> float:
    """The drop probability actually used for ``levels`` (``levels / 65536``)."""
    return levels / DROPOUT_LEVELS


def new_seed() -> int:
    """A fresh mask seed drawn from torch's default CPU generator (so ``torch.manual_seed``
    makes runs reproducible), without synchronising any accelerator. Drawn below 2^62, but a
    CPU ``torch.Generator`` seeds its mt19937 from the low 32 bits only: two draws give the same
    mask with probability 2^-32, so n masks hold about n^2 / 2^33 repeated pairs (a run of 10^5
    steps over 200 layers: about 50,000 of its 2 x 10^7 masks, each pair applied to other data)."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item())


def keep_mask(
    shape: torch.Size | tuple[int, ...], levels: int, seed: int, device: torch.device
) -> torch.Tensor:
    """Boolean keep-mask of ``shape``: each element False with probability ``levels / 65536``.

    The same ``(shape, levels, seed, device)`` always gives the same mask: the one the fused
    nodes apply (from ``dropped_positions`` where ``draws_positions``, else 16-bit lanes).
    """
    numel = 1
    for size in shape:
        numel *= size
    if draws_positions(levels, device):
        mask = torch.ones(numel, dtype=torch.bool, device=device)
        return mask.index_fill_(0, dropped_positions(numel, levels, seed, device), False).view(
            shape
        )
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=generator)
    lanes = words.view(torch.int16)[:numel]  # uniform over [-32768, 32767]
    return lanes_at_least(lanes, levels - (DROPOUT_LEVELS // 2)).view(shape)


def lanes_at_least(lanes: torch.Tensor, threshold: int) -> torch.Tensor:
    """``lanes >= threshold`` as booleans, computed in place in ``lanes`` (int16, consumed):
    ``clamp(lanes, t - 1, t) - (t - 1)`` is 1 exactly where ``lanes >= t``, else 0. Two
    vectorised int16 passes and a narrowing copy cost about half of torch's comparison operator
    on CPU (136 vs 239 us per 512 K elements, one thread, measured)."""
    if threshold <= -(DROPOUT_LEVELS // 2):  # every lane
        return torch.ones_like(lanes, dtype=torch.bool)
    if threshold >= DROPOUT_LEVELS // 2:  # no lane
        return torch.zeros_like(lanes, dtype=torch.bool)
    below = threshold - 1
    return lanes.clamp_(below, threshold).sub_(below).to(torch.uint8).view(torch.bool)


# Bit j of a packed byte is element j of its group of 8. Packing: the 8 mask bytes of a group,
# read as one 64-bit word w (byte j = element j, each 0 or 1), times this constant put element j
# at bit 56 + j with no carries, so ``(w * _GATHER_BITS) >> 56`` is the packed byte.
_GATHER_BITS = 0x0102040810204080
_BYTES_OF: dict[torch.device, torch.Tensor] = {}


def _byte_table(device: torch.device) -> torch.Tensor:
    """``table[b]``: the 64-bit word whose 8 bytes are the bits of ``b`` (0 or 1 each)."""
    if device not in _BYTES_OF:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
        _BYTES_OF[device] = bits.to(torch.uint8).view(torch.int64).reshape(256).to(device)
    return _BYTES_OF[device]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as ``ceil(numel / 8)`` bytes (element ``8i + j`` is bit ``j`` of byte i)."""
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    words = flat.view(torch.int64)
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The boolean mask of ``shape`` that ``pack_mask`` packed."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.index_select(_byte_table(packed.device), 0, packed.int())
    return words.view(torch.bool)[:numel].view(shape)


def multiplier(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 mask as numbers of ``dtype``, to multiply with. Read as bytes first: on CPU a
    bool -> float cast, or a float-by-bool product, takes a slow element-by-element path (5-9x
    a float-by-float product, measured), while the uint8 -> float cast is vectorised."""
    return mask.view(torch.uint8).to(dtype)


def draws_positions(levels: int, device: torch.device) -> bool:
    """True when masks of drop probability ``levels / 65536`` on ``device`` are drawn as the
    positions of their drops (``dropped_positions``): ``0 < p <= 1/8``, on CPU."""
    return 0 < levels <= SPARSE_LEVELS and device.type == "cpu"


def dropped_positions(numel: int, levels: int, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted flat indices (int64) of the dropped elements among ``numel``, each element dropped
    independently with probability ``p = levels / 65536``.

    Before each drop come ``floor(log(1 - U) / log(1 - p))`` kept elements: geometric, from U
    uniform on [0, 1) in float32 (a multiple of 2^-24, so each gap's probabilities are those of
    the exact geometric law within 2^-24), drawn from a generator seeded with ``seed``. Gaps
    are drawn in batches of ``p n + 8 sqrt(p n) + 16`` until they pass ``numel`` (one batch but
    about once in 10^15).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    expected = numel * drop_probability(levels)
    batch = int(expected + 8 * math.sqrt(expected) + 16)
    per_log = 1.0 / math.log1p(-drop_probability(levels))  # negative
    batches, start = [], 0  # start: the first index after the drops drawn so far
    while start < numel:
        uniform = torch.rand(batch, generator=generator, device=device)  # float32
        kept_before = torch.log1p_(uniform.neg_()).mul_(per_log).to(torch.int64)  # (batch,)
        positions = kept_before.add_(1).cumsum_(0).add_(start - 1)
        batches.append(positions)
        start = int(positions[-1]) + 1
    if not batches:  # numel == 0
        return torch.empty(0, dtype=torch.int64, device=device)
    positions = batches[0] if len(batches) == 1 else torch.cat(batches)
    return positions[: int(torch.searchsorted(positions, numel))]


class SparseMask:
    """A keep-mask held as the sorted flat positions of its dropped elements (N k elements)."""

    def __init__(self, positions: torch.Tensor, shape: tuple[int, int], levels: int) -> None:
        self.positions = positions
        self.shape = shape  # (N, k)
        self.levels = levels

    def kept(self, x_rows: torch.Tensor) -> torch.Tensor:
        """``x * mask`` (N, k) as a fresh contiguous tensor."""
        return self.zero_dropped_(x_rows.clone(memory_format=torch.contiguous_format))

    def zero_dropped_(self, rows: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """Zero, in place, the dropped elements of ``rows`` (contiguous (n, k): rows
        ``first_row`` to ``first_row + n`` of the mask); returns ``rows``."""
        positions = self.positions
        if rows.shape[0] != self.shape[0]:  # a block of rows: its positions, from its start
            low = first_row * self.shape[1]
            bounds = torch.searchsorted(positions, torch.tensor([low, low + rows.numel()]))
            positions = positions[int(bounds[0]) : int(bounds[1])] - low
        rows.view(-1).index_fill_(0, positions, 0)
        return rows

    def saved(self) -> torch.Tensor | None:
        """What backward needs to restore the positions: the steps between them as int16
        (``positions = cumsum(steps) - 1``) where the drop probability is in
        ``KEPT_GAP_LEVELS``, else nothing (``restored_mask`` draws them again from the seed)."""
        if not KEPT_GAP_LEVELS[0] <= self.levels <= KEPT_GAP_LEVELS[1]:
            return None
        return torch.diff(self.positions, prepend=self.positions.new_full((1,), -1)).to(torch.int16)


class DenseMask:
    """A keep-mask held as 0/1 numbers of the activation dtype (the boolean mask beside them)."""

    def __init__(self, keep: torch.Tensor, dtype: torch.dtype) -> None:
        self.keep = keep  # (N, k) bool
        self.factor = multiplier(keep, dtype)

    def kept(self, x_rows: torch.Tensor) -> torch.Tensor:
        """``x * mask`` (N, k), fresh."""
        return x_rows * self.factor

    def zero_dropped_(self, rows: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """``rows *= mask`` in place for rows ``first_row`` to ``first_row + n``; returns it."""
        return rows.mul_(self.factor[first_row : first_row + rows.shape[0]].to(rows.dtype))

    def saved(self) -> torch.Tensor:
        """The mask's bits, kept for backward (N k / 8 bytes)."""
        return pack_mask(self.keep)


InputMask = SparseMask | DenseMask


def input_mask(
    shape: tuple[int, int], levels: int, seed: int, device: torch.device, dtype: torch.dtype
) -> InputMask | None:
    """The keep-mask of an (N, k) input for a fused node (None without dropout): the same
    elements as ``keep_mask(shape, levels, seed, device)``."""
    if not levels:
        return None
    if draws_positions(levels, device):
        positions = dropped_positions(shape[0] * shape[1], levels, seed, device)
        return SparseMask(positions, shape, levels)
    return DenseMask(keep_mask(shape, levels, seed, device), dtype)


def restored_mask(
    bits: torch.Tensor | None,
    shape: tuple[int, int],
    levels: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> InputMask | None:
    """In backward, the mask ``input_mask`` gave in forward, from what its ``saved()`` kept:
    the packed bits, the int16 steps between the positions, or nothing (drawn again from the
    seed)."""
    if not levels:
        return None
    if bits is None:
        return input_mask(shape, levels, seed, device, dtype)
    if bits.dtype == torch.int16:
        positions = bits.cumsum(0, dtype=torch.int64).sub_(1)
        return SparseMask(positions, shape, levels)
    return DenseMask(unpack_mask(bits, shape), dtype)
