"""A cheap fingerprint of the base weights an adapter was trained on, checked on load.

Per adapted module the fingerprint keeps the base weight's shape and dtype and ``SAMPLES``
elements taken at fixed, well-spread positions of the flattened weight (a golden-ratio
sequence, so the samples hit many rows and columns whatever the shape): their exact bytes
(SHA-256) and their values as float32. Cost: one small gather per module, independent of the
weight size: for the 210 linear layers of SmolLM2-135M on 2 shared CPU cores, ``compute``
35-80 ms on a process's first call and 5-15 ms after, ``first_mismatch`` 4-18 ms (a quantized
base: 15-70 ms and 8-25 ms).

Comparison: same dtype -> the sampled bytes must be identical (any change of a sampled element
is caught, even below the dtype's precision), unless one side's samples are all exactly a
bfloat16 / float16 rounding of the other's (float32 weights rounded to bfloat16 and stored in
float32 again: the same weights as that bf16 checkpoint, which the next rule accepts);
different dtypes (an fp32 checkpoint loaded in bf16, say) -> values must agree within the
rounding of the coarser dtype (``within_dtype_rounding``, ``io.dtype_rounding``: its ``eps``
relative, 2^-7 for bfloat16, 2^-10 for float16, 2^-23 for float32 and float64, whose samples
are kept as float32; plus the subnormal spacing of the narrower range, 2^-24 when float16 is
one side).
A different checkpoint of the same shape (another fine-tune, another seed, a merged model)
differs in nearly every element, so 64 samples per module are far more than enough.

Stored as compact JSON in the safetensors header metadata under ``METADATA_KEY`` (peft, vLLM
and transformers ignore extra metadata), computed from the ORIGINAL weight of merged layers.

A base weight that accelerate offloaded (``cpu_offload``, ``device_map`` with "cpu" / "disk"
entries: the parameter on the meta device, its value in the ``AlignDevicesHook``'s
``weights_map``) is read from that map (``offloaded_weight``) and checked like any other; a
weight on the meta device with nothing to read it from (a model built on the meta device) cannot
be checked, and ``unverified_note`` says so.

A quantized base (``lorakit.quantized``) is fingerprinted by its packed codes as stored, its
format name (``bnb-nf4-dq``, ``gguf-Q4_1``, ...) in place of the dtype, its scales and its
dequantized weight's values (``lorakit.io.quantized_fingerprint``: the same format needs the
same codes and scales; against the float model or another format, the values decide).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lorakit import quantized
from lorakit.io.dtype_rounding import held_as, rounding_tolerance, within_dtype_rounding
from lorakit.layers import LoraLayer
from lorakit.layers.base import offload_hook

__all__ = [
    "METADATA_KEY",
    "METHOD",
    "SAMPLES",
    "base_identity",
    "compute",
    "describe_difference",
    "first_mismatch",
    "held_as",
    "held_base_weight",
    "module_difference",
    "module_fingerprint",
    "offloaded_weight",
    "rounded_copy",
    "rounding_tolerance",
    "within_dtype_rounding",
]

METADATA_KEY = "lorakit.base_fingerprint"
SAMPLES = 64
METHOD = "golden64-v1"  # (the sampling rule; ``fingerprint_json`` writes it)
_GOLDEN = (math.sqrt(5) - 1) / 2


def held_base_weight(module: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """``(holder, weight)``: the innermost base module of ``module`` (the one accelerate hooks)
    and the ORIGINAL base weight of a (possibly merged) LoRA layer, or the module's weight, as
    held (on the meta device where accelerate offloaded it)."""
    if not isinstance(module, LoraLayer):
        return module, module.weight
    holder = module.innermost_base()
    return holder, holder.weight if module.original_weight is None else module.original_weight


def base_weight(module: nn.Module) -> torch.Tensor:
    """The ORIGINAL base weight of a (possibly merged) LoRA layer, or the module's weight
    (``held_base_weight``); an offloaded one's value (``offloaded_weight``, read from the
    innermost base module, which accelerate hooked) where the parameter is on the meta device."""
    holder, weight = held_base_weight(module)
    if weight.device.type == "meta":
        offloaded = offloaded_weight(holder, "weight")
        if offloaded is not None:
            return offloaded
    return weight


def offloaded_weight(module: nn.Module, name: str) -> torch.Tensor | None:
    """The value of ``module``'s parameter ``name`` that accelerate keeps while the parameter
    sits on the meta device: the ``weights_map[name]`` of its offloading hook
    (``layers.base.offload_hook``: ``cpu_offload``, and ``dispatch_model`` / transformers'
    ``device_map`` for modules mapped to "cpu" or "disk"). None where no hook keeps it (a model
    built on the meta device; a hook on a parent module, accelerate's
    ``preload_module_classes``: the module is then reported as unverifiable). A "disk" entry
    is read whole from its file (accelerate reads no part of a tensor)."""
    hook = offload_hook(module)
    if hook is None:
        return None
    try:
        value = hook.weights_map[name]
    except KeyError:
        return None
    return value if isinstance(value, torch.Tensor) and value.device.type != "meta" else None


def base_identity(module: nn.Module) -> tuple[torch.Tensor, str]:
    """``(tensor, dtype name)`` that identify the base of ``module``: its original float weight
    and dtype, or for a quantized base its packed codes and format name."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if quantized.is_quantized(base):
        from lorakit.io import quantized_fingerprint

        return quantized_fingerprint.packed_codes(base), quantized.describe(base)
    weight = base_weight(module)
    return weight, _dtype_name(weight)


def is_quantized_format(dtype_name: str) -> bool:
    """True for a fingerprint's format name (``bnb-nf4-dq``), False for a torch dtype's."""
    return not isinstance(getattr(torch, dtype_name, None), torch.dtype)


@functools.lru_cache(maxsize=256)
def sample_positions(numel: int, count: int = SAMPLES) -> torch.Tensor:
    """``count`` positions in ``[0, numel)``: ``floor(frac((j + 0.5) * 0.618...) * numel)``."""
    j = torch.arange(min(count, numel), dtype=torch.float64)
    return torch.floor(torch.frac((j + 0.5) * _GOLDEN) * numel).long()


def samples_of(weight: torch.Tensor) -> torch.Tensor:
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
    samples = samples_of(weight)
    values = samples.to(torch.float32).numpy().astype("<f4").tobytes()
    return {
        "shape": list(weight.shape),
        "dtype": dtype_name or _dtype_name(weight),
        "sha256": _digest(samples),
        "values": base64.b64encode(values).decode("ascii"),
    }


def module_fingerprint(module: nn.Module) -> dict[str, object] | None:
    """The fingerprint of the base of ``module`` (a quantized one's: ``quantized_fingerprint``;
    an offloaded one's from accelerate's ``weights_map``, ``offloaded_weight``), None when its
    base weight is on the meta device with nothing to read it from."""
    weight, dtype_name = base_identity(module)
    if weight.device.type == "meta":
        return None
    if is_quantized_format(dtype_name):
        from lorakit.io import quantized_fingerprint

        base = module.base_layer if isinstance(module, LoraLayer) else module
        return quantized_fingerprint.fingerprint(base, weight, dtype_name)
    return weight_fingerprint(weight, dtype_name)


def compute(model: nn.Module, module_names: Iterable[str]) -> dict[str, dict[str, object]]:
    """Fingerprints of the base weights of ``module_names``; a module whose base weight is on
    the meta device with nothing to read it from (``module_fingerprint``) has none (callers name
    the ones left out)."""
    result = {}
    for name in module_names:
        entry = module_fingerprint(model.get_submodule(name))
        if entry is not None:
            result[name] = entry
    return result


def sample_values(fingerprint: dict[str, object]) -> torch.Tensor:
    """The float32 values a fingerprint (or its ``"dequantized"`` part) keeps of its samples."""
    raw = base64.b64decode(str(fingerprint["values"]))
    return torch.frombuffer(bytearray(raw), dtype=torch.float32)


def describe_difference(
    stored: dict[str, object], weight: torch.Tensor, dtype_name: str | None = None
) -> str | None:
    """None if ``weight`` (of ``dtype_name``, a quantized format's name, if given) fits the
    stored fingerprint, else a short reason."""
    dtype_name = dtype_name or _dtype_name(weight)
    if dtype_name != stored["dtype"] and (
        is_quantized_format(dtype_name) or is_quantized_format(str(stored["dtype"]))
    ):
        article = "an" if str(stored["dtype"])[:1] in ("a", "e", "i", "o", "u") else "a"
        return (
            f"the adapter was trained on {article} {stored['dtype']} base, this base is "
            f"{dtype_name}; a different quantization computes different outputs"
        )
    if list(weight.shape) != stored["shape"]:
        from lorakit.io.quantized_fingerprint import as_wider_storage

        wider = as_wider_storage(stored, weight) if dtype_name == stored["dtype"] else None
        if wider is None:
            return f"shape {list(weight.shape)} != {stored['shape']}"
        weight = wider  # the same bytes as an older lorakit fingerprinted them
    if dtype_name == stored["dtype"]:  # the common case: compare the digests only
        samples = samples_of(weight)
        if _digest(samples) == stored["sha256"] or rounded_copy(stored, samples):
            return None
        return "sampled weights differ"
    current = weight_fingerprint(weight)
    dtypes = (str(stored["dtype"]), str(current["dtype"]))
    if within_dtype_rounding(sample_values(stored), sample_values(current), *dtypes):
        return None
    return f"sampled weights differ beyond {stored['dtype']}/{current['dtype']} rounding"


def rounded_copy(stored: dict[str, object], samples: torch.Tensor) -> bool:
    """float32 samples whose digest differs: True when one side's are all exactly bfloat16 (or
    float16) values and equal the other side's rounded to that dtype (a bf16 checkpoint loaded
    as fp32 vs the fp32 one it came from: accepted as when held in bf16)."""
    if stored["dtype"] != "float32":
        return False
    expected, actual = sample_values(stored), samples.to(torch.float32)
    for coarse in (torch.bfloat16, torch.float16):
        for exact, other in ((actual, expected), (expected, actual)):
            representable = torch.equal(exact.to(coarse).to(torch.float32), exact)
            if representable and torch.equal(other.to(coarse).to(torch.float32), exact):
                return True
    return False


def module_difference(
    stored: dict[str, object], module: nn.Module, identity: tuple[torch.Tensor, str]
) -> str | None:
    """None if the base of ``module`` fits its ``stored`` fingerprint, else a short reason;
    ``identity``: ``base_identity(module)``. A quantized base on either side:
    ``quantized_fingerprint.difference``."""
    weight, dtype_name = identity
    if is_quantized_format(dtype_name) or is_quantized_format(str(stored["dtype"])):
        from lorakit.io import quantized_fingerprint

        return quantized_fingerprint.difference(stored, module, weight, dtype_name)
    return describe_difference(stored, weight, dtype_name)


def first_mismatch(
    model: nn.Module,
    stored: dict[str, dict[str, object]],
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None = None,
) -> tuple[str, str] | None:
    """``(module, reason)`` of the first of ``module_names`` whose base weight does not fit its
    stored fingerprint, or None. Not checked (``unverifiable`` names them): modules without a
    stored fingerprint, and those whose base weight is on the meta device with nothing to read
    it from (an offloaded one is read from accelerate's map: ``base_weight``).
    ``modules``: name -> module of ``model``, when the caller has it (saves the lookups)."""
    for name in module_names:
        if name not in stored:
            continue
        module = modules[name] if modules is not None else model.get_submodule(name)
        identity = base_identity(module)
        if identity[0].device.type == "meta":
            continue
        reason = module_difference(stored[name], module, identity)
        if reason is not None:
            return name, reason
    return None
