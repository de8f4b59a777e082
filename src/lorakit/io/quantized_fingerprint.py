"""The base fingerprint of a quantized base (``lorakit.io.fingerprint``'s quantized half).

An entry for a quantized base keeps, as before, its packed codes (``"shape"``, ``"sha256"``,
``"values"`` of the codes as stored) and its format name in place of a dtype (``"dtype":
"bnb-nf4-dq"``, ``"gguf-Q4_1"``, ...), and two more fields:

- ``"scales"``: a SHA-256 (32 hex) of the bytes of every scale the layer stores besides its
  codes (``lorakit.quantized.storage``: ``row_scales``, ``scales_and_offsets``, bitsandbytes'
  ``absmax`` / ``nested_absmax``; a GGUF block's ``d`` / ``m``, which live in the packed bytes),
  sampled at the golden-ratio positions of each tensor as the codes are. Rescaled codes (a
  SmoothQuant-style move of a layer's scale) compute other outputs from equal codes.
- ``"dequantized"``: ``{"shape": [out, in], "values": base64}``: the float32 values of the
  dequantized weight ``W0`` at the positions a float fingerprint samples of an (out, in) weight,
  computed from the blocks or rows holding them only (``dequantized_samples``).

Comparison (``difference``): the same format -> codes AND scales must be identical; otherwise
(float vs quantized, either way, or two formats) the weights' values decide: the sampled values
must agree within the rounding of the float dtype (relative ``eps`` of bfloat16 / float16 /
float32), so a float model that IS the dequantized GGUF file accepts the other's adapters, while
NF4's values, which are not the float weights, are refused. An entry without these fields
(written by an older lorakit, or of a bitsandbytes layer repacked for its CPU kernel, whose
scales were rounded and whose ``W0`` cannot be read exactly) is compared as before: codes only
for the same format, refused for another format or the float model.
"""

from __future__ import annotations

import base64
import hashlib
import math

import torch
from torch import nn

from lorakit import quantized
from lorakit.io.dequantized_samples import dequantized_samples
from lorakit.io.fingerprint import (
    SAMPLES,
    base_weight,
    describe_difference,
    is_quantized_format,
    sample_positions,
    sample_values,
    samples_of,
    weight_fingerprint,
    within_dtype_rounding,
)
from lorakit.layers import LoraLayer
from lorakit.quantized import bnb as bnb_backend
from lorakit.quantized import gguf_blocks

__all__ = [
    "as_wider_storage",
    "check_fields",
    "dequantized_samples",
    "difference",
    "fingerprint",
    "packed_codes",
]

# bytes of a GGUF block before its codes: d (Q4_0, Q8_0), d and m (Q4_1), float16 each
_GGUF_SCALE_BYTES = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}


def packed_codes(base: nn.Module) -> torch.Tensor:
    """The first tensor a quantized ``base`` stores (its packed codes); a bitsandbytes 4-bit
    layer's codes as their bytes, ``(bytes, 1)`` uint8, whatever dtype holds them
    (``bnb_4bit_quant_storage``: bfloat16 for FSDP-QLoRA keeps the same bytes as ``(bytes / 2,
    1)``), so one adapter fits every storage dtype of the same codes."""
    codes = next(iter(quantized.storage(base).values()))
    backend = quantized.backend_for(base)
    if backend is bnb_backend and bnb_backend.is_4bit(base) and codes.dtype != torch.uint8:
        return codes.view(torch.uint8).reshape(-1, 1)  # (bytes, 1), as a uint8 storage holds it
    return codes


def fingerprint(base: nn.Module, codes: torch.Tensor, format_name: str) -> dict[str, object]:
    """The entry of a quantized ``base`` (module docstring): the codes' fields, plus
    ``"scales"`` and ``"dequantized"`` where the layer's scales and ``W0`` can be read."""
    entry = weight_fingerprint(codes, format_name)
    scales, values = _scales_digest(base), dequantized_samples(base)
    if scales is not None and values is not None:
        entry["scales"] = scales
        entry["dequantized"] = {
            "shape": list(quantized.shape(base)),
            "values": base64.b64encode(values.numpy().astype("<f4").tobytes()).decode("ascii"),
        }
    return entry


def check_fields(name: str, entry: dict) -> None:
    """``ValueError`` unless the optional ``"scales"`` is a string and ``"dequantized"`` is
    ``{"shape": [out, in], "values": base64 of one float32 per sample}``."""
    if "scales" in entry and not isinstance(entry["scales"], str):
        raise ValueError(f"module {name!r}: scales is not a string")
    if "dequantized" not in entry:
        return
    values = entry["dequantized"]
    shape = values.get("shape") if isinstance(values, dict) else None
    if not isinstance(shape, list) or len(shape) != 2 or not all(_size(n) for n in shape):
        raise ValueError(f"module {name!r}: dequantized shape {shape!r} is not [out, in]")
    try:
        if not isinstance(values.get("values"), str):
            raise ValueError
        raw = base64.b64decode(values["values"], validate=True)
    except ValueError:
        raise ValueError(f"module {name!r}: dequantized values are not base64") from None
    if len(raw) != 4 * min(SAMPLES, math.prod(shape)):
        raise ValueError(f"module {name!r}: {len(raw)} bytes of dequantized values for {shape}")


def _size(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


_WIDER_STORAGE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes per element


def as_wider_storage(stored: dict[str, object], codes: torch.Tensor) -> torch.Tensor | None:
    """uint8 ``codes`` (bytes, 1) viewed as the (bytes / w, 1) tensor of w-byte elements a
    fingerprint of that shape was taken of: a bitsandbytes 4-bit base fingerprinted by an older
    lorakit in its ``bnb_4bit_quant_storage`` dtype (bfloat16: w = 2). None where the shapes do
    not pair that way. The digest is of the sampled elements' bytes, so the view gives it again
    when the codes are the same."""
    shape = stored["shape"]
    if codes.dtype != torch.uint8 or list(codes.shape[1:]) != [1] or shape[1:] != [1]:
        return None
    elements = shape[0]
    width = codes.shape[0] // elements if elements else 0
    wider = _WIDER_STORAGE.get(width)
    if wider is None or width * elements != codes.shape[0]:
        return None
    return codes.reshape(elements, width).view(wider)  # (bytes / w, 1)


# ------------------------------------------------------------------------------- the scales
def _scale_samples(base: nn.Module) -> list[torch.Tensor] | None:
    """The sampled elements of each scale tensor of ``base`` (storage order), None where the
    stored scales are not the layer's own (a repacked bitsandbytes layer: rounded to bfloat16).
    A GGUF layer's scales are the first 2 or 4 bytes of each block of its packed bytes."""
    if bnb_backend.is_repacked(base):
        return None
    if quantized.backend_for(base) is gguf_blocks:
        fmt = gguf_blocks.block_format(base.block_type)
        width = _GGUF_SCALE_BYTES[fmt.name]
        blocks = base.packed.reshape(-1, fmt.block_bytes)  # (out * in / 32, block bytes)
        positions = sample_positions(blocks.shape[0] * width).to(blocks.device)
        return [blocks[positions // width, positions % width].cpu()]
    tensors = list(quantized.storage(base).values())[1:]
    return [samples_of(tensor) for tensor in tensors]


def _scales_digest(base: nn.Module) -> str | None:
    samples = _scale_samples(base)
    if samples is None:
        return None
    digest = hashlib.sha256()
    for tensor in samples:
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------- comparison
def difference(
    stored: dict[str, object], module: nn.Module, identity: torch.Tensor, kind: str
) -> str | None:
    """None if the base of ``module`` fits ``stored``, else a short reason (see the module
    docstring); one side at least quantized. ``identity``, ``kind``: the base's
    ``base_identity`` (its codes and format name, or its float weight and dtype name)."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    stored_format, is_quantized = str(stored["dtype"]), quantized.is_quantized(base)
    if is_quantized and kind == stored_format:
        reason = describe_difference(stored, identity, kind)  # the codes
        scales = _scales_digest(base) if "scales" in stored else None
        if reason is None and scales is not None and scales != stored["scales"]:
            reason = "sampled scales differ: the same codes compute other weights"
        return reason
    expected = stored.get("dequantized") if is_quantized_format(stored_format) else stored
    if is_quantized:
        actual, shape = dequantized_samples(base), list(quantized.shape(base))
    else:
        weight = base_weight(module)
        actual, shape = samples_of(weight).to(torch.float32), list(weight.shape)
    if expected is None or actual is None:  # an older file, or a repacked layer: as before
        return describe_difference(stored, identity, kind)
    if shape != expected["shape"]:
        return f"shape {shape} != {expected['shape']}"
    rounding = _coarser(stored_format, kind)
    if _within_rounding(sample_values(expected), actual, rounding):
        return None
    article = "an" if stored_format[:1] in ("a", "e", "i", "o", "u") else "a"  # (an int8-rows)
    trained = f"the adapter was trained on {article} {stored_format} base, this base is {kind}"
    if is_quantized and is_quantized_format(stored_format):
        return f"{trained}; a different quantization computes different outputs"
    return (
        f"{trained}; the quantized weights differ from the float ones: sampled values differ "
        f"beyond {str(rounding).removeprefix('torch.')} rounding"
    )


def _coarser(*names: str) -> torch.dtype:
    """The coarsest float dtype among ``names`` (a format name counts as float32, the
    dtype of dequantized values; float64 too, as fingerprints keep float32 values)."""
    dtypes = [torch.float32]
    for name in names:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            dtypes.append(dtype)
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def _within_rounding(expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype) -> bool:
    """``|e - a| <= eps * max(|e|, |a|) + the dtype's subnormal spacing``, element-wise: the
    float fingerprint's rule (``fingerprint.within_dtype_rounding``) for the one ``dtype``."""
    if expected.shape != actual.shape:
        return False
    return within_dtype_rounding(expected, actual, str(dtype).removeprefix("torch."))


def entries_difference(first: dict[str, object], second: dict[str, object]) -> str | None:
    """None when two stored entries of one module, one at least of a quantized base, describe
    the same base (the rule of ``difference``, between two files: ``lorakit combine`` and the
    server's mixtures); else why not. The same format: codes, and scales where both keep them;
    otherwise the sampled values (a quantized entry's ``"dequantized"`` ones) within the coarser
    dtype's rounding. An older entry without values: another format is another base."""
    formats = (str(first["dtype"]), str(second["dtype"]))
    if formats[0] == formats[1]:
        if first["shape"] != second["shape"] or first["sha256"] != second["sha256"]:
            return "sampled base weights differ"
        if "scales" in first and "scales" in second and first["scales"] != second["scales"]:
            return "sampled scales differ: the same codes compute other weights"
        return None
    values = [
        entry.get("dequantized") if is_quantized_format(str(entry["dtype"])) else entry
        for entry in (first, second)
    ]
    if values[0] is None or values[1] is None:
        return f"base formats {formats[0]} and {formats[1]}"
    if values[0]["shape"] != values[1]["shape"]:
        return f"base shapes {values[0]['shape']} and {values[1]['shape']}"
    rounding = _coarser(*formats)
    if _within_rounding(sample_values(values[0]), sample_values(values[1]), rounding):
        return None
    return (
        f"base formats {formats[0]} and {formats[1]}: sampled values differ beyond "
        f"{str(rounding).removeprefix('torch.')} rounding"
    )
