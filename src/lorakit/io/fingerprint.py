"""A cheap fingerprint of the base weights an adapter was trained on, checked on load.

Per adapted module the fingerprint keeps the base weight's shape and dtype and ``SAMPLES``
elements taken at fixed, well-spread positions of the flattened weight (a golden-ratio
sequence, so the samples hit many rows and columns whatever the shape): their exact bytes
(SHA-256) and their values as float32. Cost: one small gather per module, independent of the
weight size (7-8 ms for all 210 linear layers of SmolLM2-135M on a 2-core CPU).

Comparison: same dtype -> the sampled bytes must be identical (any change of a sampled element
is caught, even below the dtype's precision); different dtypes (an fp32 checkpoint loaded in
bf16, say) -> values must agree within the rounding of the coarser dtype (relative 2^-7).
A different checkpoint of the same shape (another fine-tune, another seed, a merged model)
differs in nearly every element, so 64 samples per module are far more than enough.

Stored as compact JSON in the safetensors header metadata under ``METADATA_KEY`` (peft, vLLM
and transformers ignore extra metadata), computed from the ORIGINAL weight of merged layers.

A quantized base (``lorakit.quantized``) is fingerprinted by its packed codes as stored (a
bitsandbytes 4-bit layer's as uint8 bytes, whatever its ``quant_storage`` dtype), with
its format name (``bnb-nf4-dq``, ``gguf-Q4_1``, ...) in place of the dtype: an adapter trained on
one quantization of a model does not fit another quantization, nor the float model, unless the
user says so (``allow_base_mismatch``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lorakit import quantized
from lorakit.errors import AdapterFileError, BaseModelMismatchError, listed
from lorakit.layers import LoraLayer
from lorakit.quantized import bnb as bnb_backend

__all__ = [
    "METADATA_KEY",
    "compute",
    "first_mismatch",
    "from_metadata",
    "refuse_other_base",
    "to_metadata",
    "unverifiable",
    "unverified_note",
]

METADATA_KEY = "lorakit.base_fingerprint"
SAMPLES = 64
_METHOD = "golden64-v1"
_GOLDEN = (math.sqrt(5) - 1) / 2
_RELATIVE_TOLERANCE = 2.0**-7  # rounding to bf16 (and fp16 -> bf16 double rounding)
_ABSOLUTE_TOLERANCE = 6e-8  # fp16 subnormal spacing


def base_weight(module: nn.Module) -> torch.Tensor:
    """The ORIGINAL base weight of a (possibly merged) LoRA layer, or the module's weight."""
    if isinstance(module, LoraLayer):
        if module.original_weight is not None:
            return module.original_weight
        return module.base_layer.weight
    return module.weight


def base_identity(module: nn.Module) -> tuple[torch.Tensor, str]:
    """``(tensor, dtype name)`` that identify the base of ``module``: its original float weight
    and dtype, or for a quantized base its packed codes and format name."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if quantized.is_quantized(base):
        return _packed_codes(base), quantized.describe(base)
    weight = base_weight(module)
    return weight, _dtype_name(weight)


def _packed_codes(base: nn.Module) -> torch.Tensor:
    """The first tensor a quantized ``base`` stores (its packed codes); a bitsandbytes 4-bit
    layer's codes as their bytes, ``(bytes, 1)`` uint8, whatever dtype holds them
    (``bnb_4bit_quant_storage``: bfloat16 for FSDP-QLoRA keeps the same bytes as ``(bytes / 2,
    1)``), so one adapter fits every storage dtype of the same codes."""
    codes = next(iter(quantized.storage(base).values()))
    backend = quantized.backend_for(base)
    if backend is bnb_backend and bnb_backend.is_4bit(base) and codes.dtype != torch.uint8:
        return codes.view(torch.uint8).reshape(-1, 1)  # (bytes, 1), as a uint8 storage holds it
    return codes


def _is_quantized_format(dtype_name: str) -> bool:
    return not isinstance(getattr(torch, dtype_name, None), torch.dtype)


@functools.lru_cache(maxsize=256)
def sample_positions(numel: int, count: int = SAMPLES) -> torch.Tensor:
    """``count`` positions in ``[0, numel)``: ``floor(frac((j + 0.5) * 0.618...) * numel)``."""
    j = torch.arange(min(count, numel), dtype=torch.float64)
    return torch.floor(torch.frac((j + 0.5) * _GOLDEN) * numel).long()


def _samples(weight: torch.Tensor) -> torch.Tensor:
    """The sampled elements of ``weight`` (flattened), on the CPU."""
    flat = weight.detach().reshape(-1)
    return flat[sample_positions(flat.numel()).to(flat.device)].cpu().contiguous()


def _digest(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def _dtype_name(weight: torch.Tensor) -> str:
    return str(weight.dtype).removeprefix("torch.")


def weight_fingerprint(weight: torch.Tensor, dtype_name: str | None = None) -> dict[str, object]:
    """``{"shape", "dtype", "sha256", "values"}`` of one weight (see the module docstring);
    ``dtype_name``: a quantized base's format name, in place of the tensor's dtype."""
    samples = _samples(weight)
    values = samples.to(torch.float32).numpy().astype("<f4").tobytes()
    return {
        "shape": list(weight.shape),
        "dtype": dtype_name or _dtype_name(weight),
        "sha256": _digest(samples),
        "values": base64.b64encode(values).decode("ascii"),
    }


def compute(model: nn.Module, module_names: Iterable[str]) -> dict[str, dict[str, object]]:
    """Fingerprints of the base weights of ``module_names``; a module whose base weight is on
    the meta device (offloaded) has none (callers name the ones left out)."""
    result = {}
    for name in module_names:
        weight, dtype_name = base_identity(model.get_submodule(name))
        if weight.device.type != "meta":
            result[name] = weight_fingerprint(weight, dtype_name)
    return result


def to_metadata(fingerprints: dict[str, dict[str, object]]) -> str:
    """Compact, deterministic JSON for the safetensors header."""
    payload = {"method": _METHOD, "modules": fingerprints}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def from_metadata(text: str, source: str) -> dict[str, dict[str, object]]:
    """Parse the header entry written by ``to_metadata``, checking every entry's fields and
    types (``AdapterFileError`` naming the first bad one)."""
    try:
        payload = json.loads(text)
        if not isinstance(payload, dict) or payload.get("method") != _METHOD:
            method = payload.get("method") if isinstance(payload, dict) else None
            raise ValueError(f"unknown method {method!r}")
        modules = payload.get("modules")
        if not isinstance(modules, dict):
            raise ValueError("'modules' is not an object")
        for name, entry in modules.items():
            _check_entry(name, entry)
        return dict(modules)
    except RecursionError:
        error = ValueError("JSON nested too deeply")
    except ValueError as caught:
        error = caught
    raise AdapterFileError(
        f"{source}: the base-model fingerprint ({METADATA_KEY}) is unreadable ({error}); "
        "the file may be corrupted, or written by a newer lorakit."
    )


def _check_entry(name: str, entry: object) -> None:
    """``ValueError`` unless ``entry`` is ``{"shape": [int >= 0], "dtype": str, "sha256": str,
    "values": base64 of one float32 per sample}``."""
    if not isinstance(entry, dict):
        raise ValueError(f"module {name!r}: not an object")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"module {name!r}: shape {shape!r} is not a list of integers >= 0")
    for field in ("dtype", "sha256", "values"):
        if not isinstance(entry.get(field), str):
            raise ValueError(f"module {name!r}: {field} is missing or not a string")
    try:
        values = base64.b64decode(entry["values"], validate=True)
    except ValueError:
        raise ValueError(f"module {name!r}: values are not base64") from None
    if len(values) != 4 * min(SAMPLES, math.prod(shape)):
        raise ValueError(f"module {name!r}: {len(values)} bytes of values for shape {shape}")


def _values(fingerprint: dict[str, object]) -> torch.Tensor:
    raw = base64.b64decode(str(fingerprint["values"]))
    return torch.frombuffer(bytearray(raw), dtype=torch.float32)


_WIDER_STORAGE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes per element


def _as_wider_storage(stored: dict[str, object], codes: torch.Tensor) -> torch.Tensor | None:
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


def describe_difference(
    stored: dict[str, object], weight: torch.Tensor, dtype_name: str | None = None
) -> str | None:
    """None if ``weight`` (of ``dtype_name``, a quantized format's name, if given) fits the
    stored fingerprint, else a short reason."""
    dtype_name = dtype_name or _dtype_name(weight)
    if dtype_name != stored["dtype"] and (
        _is_quantized_format(dtype_name) or _is_quantized_format(str(stored["dtype"]))
    ):
        return (
            f"the adapter was trained on a {stored['dtype']} base, this base is {dtype_name}; "
            "a different quantization computes different outputs"
        )
    if list(weight.shape) != stored["shape"]:
        wider = _as_wider_storage(stored, weight) if dtype_name == stored["dtype"] else None
        if wider is None:
            return f"shape {list(weight.shape)} != {stored['shape']}"
        weight = wider  # the same bytes as an older lorakit fingerprinted them
    if dtype_name == stored["dtype"]:  # the common case: compare the digests only
        return None if _digest(_samples(weight)) == stored["sha256"] else "sampled weights differ"
    current = weight_fingerprint(weight)
    expected, actual = _values(stored), _values(current)
    tolerance = _RELATIVE_TOLERANCE * torch.maximum(expected.abs(), actual.abs())
    if bool(((expected - actual).abs() <= tolerance + _ABSOLUTE_TOLERANCE).all()):
        return None
    return f"sampled weights differ beyond {stored['dtype']}/{current['dtype']} rounding"


def first_mismatch(
    model: nn.Module,
    stored: dict[str, dict[str, object]],
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None = None,
) -> tuple[str, str] | None:
    """``(module, reason)`` of the first of ``module_names`` whose base weight does not fit its
    stored fingerprint (modules without a stored fingerprint are not checked), or None.
    ``modules``: name -> module of ``model``, when the caller has it (saves the lookups)."""
    for name in module_names:
        if name not in stored:
            continue
        module = modules[name] if modules is not None else model.get_submodule(name)
        weight, dtype_name = base_identity(module)
        if weight.device.type == "meta":
            continue
        reason = describe_difference(stored[name], weight, dtype_name)
        if reason is not None:
            return name, reason
    return None


def unverifiable(
    model: nn.Module,
    stored: dict[str, dict[str, object]],
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None = None,
) -> list[str]:
    """Those of ``module_names`` that ``first_mismatch`` cannot check: no stored fingerprint,
    though their base weights are here (not on the meta device). Looks up only these names."""
    missing = []
    for name in module_names:
        if name in stored:
            continue
        module = modules[name] if modules is not None else model.get_submodule(name)
        weight, _ = base_identity(module)
        if weight.device.type != "meta":
            missing.append(name)
    return missing


def unverified_note(
    model: nn.Module,
    stored: dict[str, dict[str, object]] | None,
    label: object,
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None = None,
) -> str | None:
    """The one warning for an adapter whose base ``refuse_other_base`` cannot fully check, for
    every path that loads one (``load_adapter``, the server, mixtures, ``--resume``); None when
    its fingerprint covers all of ``module_names`` that are here (``unverifiable``).

    ``stored`` None (written by peft or another tool): ``adapter <label> has no base-model
    fingerprint ...``; else ``adapter <label> has a base-model fingerprint that does not cover
    N of its modules (<names>) ...``.
    """
    if stored is None:
        return (
            f"adapter {label} has no base-model fingerprint (written by peft or another tool): "
            "lorakit cannot verify it was trained on this base model."
        )
    unchecked = unverifiable(model, stored, module_names, modules)
    if not unchecked:
        return None
    return (
        f"adapter {label} has a base-model fingerprint that does not cover {len(unchecked)} of "
        f"its modules ({listed(unchecked, 3)}): lorakit cannot verify those were trained on this "
        "base model. Re-save the adapter from its base model (with the base weights in memory, "
        "not offloaded) to record them."
    )


def refuse_other_base(
    model: nn.Module,
    stored: dict[str, dict[str, object]] | None,
    directory: object,
    module_names: Iterable[str],
    *,
    allow_mismatch: bool,
    remedy: str,
    modules: Mapping[str, nn.Module] | None = None,
) -> str | None:
    """The one rule for an adapter saved on other base weights, for every path that loads one.

    ``stored``: the fingerprint saved with the adapter in ``directory`` (None: written by peft
    or another tool, nothing to verify); ``module_names``: the modules to check
    (``first_mismatch``). When one does not fit, the message is
    ``adapter <directory> was trained on different base weights: module <m> does not match the
    fingerprint saved with the adapter (<reason>).``: raised as ``BaseModelMismatchError`` with
    ``remedy`` (what the caller's user can do) appended, or, with ``allow_mismatch``, returned
    for the caller to warn with. None when the weights fit.
    """
    if stored is None:
        return None
    found = first_mismatch(model, stored, module_names, modules)
    if found is None:
        return None
    module, reason = found
    message = (
        f"adapter {directory} was trained on different base weights: module {module!r} "
        f"does not match the fingerprint saved with the adapter ({reason})."
    )
    if not allow_mismatch:
        raise BaseModelMismatchError(f"{message} {remedy}")
    return message
