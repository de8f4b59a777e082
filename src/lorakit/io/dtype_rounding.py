"""The rounding two float dtypes allow between sampled values of one weight (the base
fingerprint's comparison across dtypes, ``io.fingerprint``; ``combining.compatible`` and
``io.quantized_fingerprint`` apply the same rule).

``|e - a| <= relative * max(|e|, |a|) + absolute`` element-wise, with ``relative`` the largest
``finfo.eps`` of the dtypes (2^-7 bfloat16, 2^-10 float16, 2^-23 float32; float32 always
counts, as fingerprints keep float32 values) and ``absolute`` the largest subnormal spacing
``finfo.tiny * finfo.eps`` (2^-24 when float16 is one side); a side whose samples are all
bfloat16 (float16) values counts as that dtype (``held_as``).
"""

from __future__ import annotations

import torch

__all__ = ["held_as", "rounding_tolerance", "within_dtype_rounding"]

# the rounding allowed to a caller that does not know the dtypes (``within_dtype_rounding``)
_COARSEST_DTYPES = ("bfloat16", "float16")


def rounding_tolerance(*dtype_names: str) -> tuple[float, float]:
    """``(relative, absolute)`` rounding of values held in any of ``dtype_names``: relative the
    largest ``finfo.eps`` (2^-7 bfloat16, 2^-10 float16, 2^-23 float32), absolute the largest
    subnormal spacing ``finfo.tiny * finfo.eps`` (2^-24 for float16, whose range is the narrowest
    though bfloat16's eps is the larger: a bf16 / fp16 pair takes both). float32 always counts,
    as fingerprints keep float32 values (float64 and a quantized format's dequantized values are
    compared as float32); names that are not float dtypes (a quantized format's) add nothing."""
    infos = [torch.finfo(torch.float32)]
    for name in dtype_names:
        dtype = getattr(torch, str(name), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            infos.append(torch.finfo(dtype))
    return max(info.eps for info in infos), max(info.tiny * info.eps for info in infos)


def within_dtype_rounding(expected: torch.Tensor, actual: torch.Tensor, *dtype_names: str) -> bool:
    """Sampled values of one weight held in the float dtypes ``dtype_names`` (the two sides'):
    ``|e - a| <= relative * max(|e|, |a|) + absolute`` element-wise, with the coarser dtype's
    ``rounding_tolerance`` (``eps`` relative, not the half-ulp of one rounding: fp32 -> fp16 ->
    bf16 rounds twice). An fp32 base loaded in fp16 is held to fp16's 2^-10, so a base 0.3% off
    is refused in fp16 as in fp32; a side whose samples are all bf16 (fp16) values is a 16-bit
    checkpoint held wider and counts as that dtype (``held_as``). Without ``dtype_names`` (a
    caller that does not know them): the coarsest lorakit meets, bfloat16's eps and float16's
    subnormal spacing."""
    names = (*dtype_names, *held_as(expected), *held_as(actual)) if dtype_names else ()
    relative, absolute = rounding_tolerance(*(names or _COARSEST_DTYPES))
    tolerance = relative * torch.maximum(expected.abs(), actual.abs()) + absolute
    return bool(((expected - actual).abs() <= tolerance).all())


def held_as(values: torch.Tensor) -> tuple[str, ...]:
    """The 16-bit dtypes of which every one of ``values`` (float32 samples) is a value, within
    float16's subnormal spacing: a bf16 checkpoint held in fp16, fp32 or fp64 is judged by
    bfloat16's rounding (``within_dtype_rounding``), as that checkpoint held in bf16 is, so one
    set of weights gets one verdict whatever dtype a loader holds it in. A weight 0.3% off
    another, held in fp16, is no bf16 value (its low mantissa bits are not all zero)."""
    spacing = torch.finfo(torch.float16).tiny * torch.finfo(torch.float16).eps
    held = []
    for dtype in (torch.bfloat16, torch.float16):
        rounded = values.to(dtype).to(torch.float32)
        if bool(((rounded - values).abs() <= spacing).all()):
            held.append(str(dtype).removeprefix("torch."))
    return tuple(held)
