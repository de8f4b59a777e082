"""A quantized frozen base under LoRA (QLoRA): one protocol, one file per backend.

A LoRA layer needs only two things from its frozen base (``h = base(x) + s B A x``):

- ``base_forward(module, x)``: the base layer's own output, computed by its own kernel;
- ``dequantized_weight(module)``: ``W0`` as a float32 (out, in) tensor, for merging
  (``W = dequant(W0) + s B A``, see ``lorakit.quantized.merge``) and for checks.

plus ``describe(module)`` (the format's name, for errors and fingerprints) and
``storage(module)`` (the packed tensors as stored, to prove they are never changed).

Backends, tried in order, first match wins; each is imported only when a module matches it, so
bitsandbytes and torchao stay optional (``pip install "lorakit[quant]"``):

===================  ===========================================================================
``bnb``              bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double quantization)
                     and ``Linear8bitLt`` (LLM.int8), also as loaded by transformers with
                     ``BitsAndBytesConfig``
``torchao``          an ``nn.Linear`` whose weight is torchao's weight-only ``Int8Tensor``
                     (``quantize_(model, Int8WeightOnlyConfig())``)
``gguf_blocks``      lorakit's ``GGUFLinear``: Q4_0 / Q4_1 / Q8_0 blocks read from a GGUF file
``int8_rows``        lorakit's ``Int8RowsLinear``: weight-only int8 with per-row scales, run by
                     torch's int8 kernel (the fast CPU base for serving, ``int8-rows``)
``int4_groups``      lorakit's ``Int4GroupsLinear``: 4-bit codes with a scale and an offset per
                     32 inputs (Q4_1's scheme), run by torch's int4 kernel (``int4-groups``)
===================  ===========================================================================

Anything else that looks quantized (a class named like a quantized layer, e.g. optimum-quanto's
``QLinear``, which subclasses ``nn.Linear``; or a weight that is not a plain float tensor) is
refused by ``check_supported`` with ``UnsupportedQuantizedLayerError``, never treated as a plain
``nn.Linear``: its ``.weight`` is not the matrix its forward uses, so a merge would be wrong.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from lorakit.errors import UserError

__all__ = [
    "UnsupportedQuantizedLayerError",
    "backend_for",
    "base_forward",
    "check_supported",
    "dequantized_weight",
    "describe",
    "is_quantized",
    "looks_quantized",
    "shape",
    "storage",
]


class UnsupportedQuantizedLayerError(UserError, TypeError):
    """A quantized layer type (or block format) lorakit does not know how to run or merge."""


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _mro_paths(module: nn.Module) -> tuple[str, ...]:
    return _class_mro_paths(type(module))


@functools.cache
def _class_mro_paths(cls: type) -> tuple[str, ...]:
    """The class paths of ``cls`` and its bases."""
    return tuple(_class_path(base) for base in cls.__mro__)


# The predicates take the layer's class and its ``weight``'s class (a torchao layer is a plain
# nn.Linear holding a torchao tensor), so what they decide can be cached per pair of classes.
def _is_bnb_layer(layer: type, weight: type) -> bool:
    return any(
        path.startswith("bitsandbytes.") and path.endswith((".Linear4bit", ".Linear8bitLt"))
        for path in _class_mro_paths(layer)
    )


def _is_torchao_int8(layer: type, weight: type) -> bool:
    return (
        issubclass(layer, nn.Linear)
        and _class_path(weight).startswith("torchao.")
        and weight.__name__ == "Int8Tensor"
    )


def _is_gguf_linear(layer: type, weight: type) -> bool:
    return "lorakit.quantized.gguf_blocks.GGUFLinear" in _class_mro_paths(layer)


def _is_int8_rows_linear(layer: type, weight: type) -> bool:
    return "lorakit.quantized.int8_rows.Int8RowsLinear" in _class_mro_paths(layer)


def _is_int4_groups_linear(layer: type, weight: type) -> bool:
    return "lorakit.quantized.int4_groups.Int4GroupsLinear" in _class_mro_paths(layer)


# (accepts, backend module, what it runs, for messages): first match wins; the one list of the
# supported layer types (``_supported_layers``). The predicates look at class names only, so no
# backend library is imported to decide; the backend module is imported when it is used.
_DISPATCH: list[tuple[Callable[[type, type], bool], str, str]] = [
    (_is_gguf_linear, "lorakit.quantized.gguf_blocks", "lorakit GGUFLinear (Q4_0/Q4_1/Q8_0)"),
    (_is_int8_rows_linear, "lorakit.quantized.int8_rows", "lorakit Int8RowsLinear (int8-rows)"),
    (
        _is_int4_groups_linear,
        "lorakit.quantized.int4_groups",
        "lorakit Int4GroupsLinear (int4-groups)",
    ),
    (_is_bnb_layer, "lorakit.quantized.bnb", "bitsandbytes Linear4bit/Linear8bitLt"),
    (_is_torchao_int8, "lorakit.quantized.torchao", "torchao Int8WeightOnly"),
]


def _supported_layers() -> str:
    """The quantized layer types lorakit runs, for messages: every backend of ``_DISPATCH``,
    in its order, so a new backend is named wherever formats are listed."""
    return ", ".join(label for _, _, label in _DISPATCH)


# Class names (or modules) that mark a quantized layer: refused unless a backend took it first.
# ("Quantizer" / "Quantization" are left out: float vector-quantizer modules, e.g. wav2vec2's.)
_QUANTIZED_NAME = re.compile(
    r"quant(?!iz(?:er|ation))|qlinear|gptq|awq|hqq|bitsandbytes|bnb|gguf|ggml|eetq|aqlm|"
    r"marlin|exllama|fp8|fp4|nf4|int8|int4|4bit|8bit",
    re.IGNORECASE,
)
# Class names alone (not their module paths: every class of transformers' BitNet model lives in
# ``...bitnet...``, its norms and blocks are float) that mark a linear quantizing in its forward
# (BitNet's ``AutoBitLinear`` / ``BitLinear``) or stored another way (``CompressedLinear``).
_QUANTIZED_CLASS_NAME = re.compile(r"bitlinear|ternary|compressedlinear", re.IGNORECASE)
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def backend_for(module: nn.Module) -> ModuleType | None:
    """The backend module that runs ``module`` (first match wins), or None for a module no
    backend claims (a plain float layer, or an unknown quantized one: see ``check_supported``).
    The layer's state is not checked here (``check_supported`` does)."""
    return _backend_for_classes(type(module), type(getattr(module, "weight", None)))


@functools.cache
def _backend_for_classes(layer: type, weight: type) -> ModuleType | None:
    """``backend_for`` by the classes it looks at (cached: a LoRA layer over a quantized base
    asks at every forward, and the search and import cost about 3 us a call)."""
    for accepts, backend_path, _ in _DISPATCH:
        if accepts(layer, weight):
            return importlib.import_module(backend_path)
    return None


def is_quantized(module: nn.Module) -> bool:
    """True if a known backend runs ``module`` (its weight is quantized storage)."""
    return backend_for(module) is not None


def looks_quantized(module: nn.Module) -> str | None:
    """Why ``module`` looks like a quantized layer no backend knows, or None if it looks plain:
    a class (or base class, outside torch) named like one (e.g. transformers' BitNet
    ``AutoBitLinear``, which quantizes a float weight in its forward), a direct parameter /
    buffer that is not a plain tensor, a parameter or ``weight`` that is not floating point, or
    an ``nn.Linear`` without a ``weight`` tensor (its weights stored under other names)."""
    for path in _mro_paths(module):
        outside_torch = not path.startswith("torch.")
        class_name = path.rsplit(".", 1)[-1]
        if outside_torch and (
            _QUANTIZED_NAME.search(path) or _QUANTIZED_CLASS_NAME.search(class_name)
        ):
            return f"its class {path} is a quantized layer type"
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    for name, tensor in tensors:
        if type(tensor) not in _PLAIN_TENSOR_TYPES:
            return f"its {name!r} is a {_class_path(type(tensor))}, not a plain tensor"
    for name, parameter in module.named_parameters(recurse=False):
        if not parameter.is_floating_point():  # (integer buffers, e.g. position ids, are fine)
            return f"its parameter {name!r} is stored as {parameter.dtype}, not a float type"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        return f"its weight is stored as {weight.dtype}, not a float type"
    if isinstance(module, nn.Linear) and not isinstance(weight, torch.Tensor):
        return "it is an nn.Linear without a weight tensor (its weights are stored another way)"
    return None


def check_supported(module: nn.Module, module_name: str) -> None:
    """Raise ``UnsupportedQuantizedLayerError`` (naming the module and its class) if ``module``
    looks quantized but no backend runs it, or a backend's layer is in a state it cannot use
    (not quantized yet, repacked); return quietly for usable quantized and for plain layers."""
    backend = backend_for(module)
    if backend is not None:
        try:
            backend.check(module)
        except UnsupportedQuantizedLayerError as error:
            raise UnsupportedQuantizedLayerError(f"module {module_name!r}: {error}") from None
        return
    reason = looks_quantized(module)
    if reason is not None:
        raise UnsupportedQuantizedLayerError(
            f"module {module_name!r} ({_class_path(type(module))}) looks quantized ({reason}); "
            "lorakit does not know this format and will not treat it as a plain nn.Linear (its "
            "weight is not the matrix its forward uses, so a merge would be wrong). Supported: "
            f"{_supported_layers()}. Load the base in float or in one of these, or exclude the "
            "module (exclude_modules)."
        )


def _backend(module: nn.Module) -> ModuleType:
    """The backend of a usable quantized layer; ``UnsupportedQuantizedLayerError`` otherwise."""
    backend = backend_for(module)
    if backend is None:
        raise UnsupportedQuantizedLayerError(
            f"{_class_path(type(module))} is not a quantized layer lorakit knows "
            "(see lorakit.quantized for the supported formats)"
        )
    backend.check(module)
    return backend


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``W0`` of a quantized linear base as a new float32 tensor of shape (out, in)."""
    return _backend(module).dequantized_weight(module)


def base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's output ``W0 x + b`` (..., out) for ``x`` (..., in), by its own kernel.

    Called at every forward of a LoRA layer over a quantized base, so each backend's
    ``base_forward`` refuses an unusable state itself, from what its kernel reads anyway
    (``check`` on every call cost about 2 us of a 4-bit decode step's ~200 us)."""
    backend = backend_for(module)
    if backend is None:
        _backend(module)  # raises, naming the class
    return backend.base_forward(module, x)


def describe(module: nn.Module) -> str:
    """The storage format, e.g. ``"bnb-nf4-dq"``, ``"bnb-int8"``, ``"gguf-Q4_1"``."""
    return _backend(module).describe(module)


def shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a quantized linear base."""
    return _backend(module).shape(module)


def storage(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that hold the quantized weight, as stored (packed codes and scales)."""
    return _backend(module).storage(module)
