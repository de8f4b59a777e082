"""What a user wants to know about an adapter before using it, from its config and the
safetensors HEADER only (no tensor is read, so it is instant for any file size).

Compression ratio: over the adapted matrices, ``sum d*k / sum r*(d+k)`` (the base parameters
the adapter changes, per trainable LoRA parameter; ``functional.lora_parameter_count``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from lorakit import functional
from lorakit.errors import AdapterFileError
from lorakit.io.config_json import CONFIG_NAME, config_from_json
from lorakit.io.fingerprint import METADATA_KEY
from lorakit.io.header import read_header
from lorakit.io.keys import parse_lora_key
from lorakit.io.read import PICKLE_NAME, WEIGHTS_NAME, adapter_directory, pickle_refusal

__all__ = ["summarize_adapter"]


def _factor_shapes(tensors) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {"lora_A": shape, "lora_B": shape}}`` from the header entries."""
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is not None:
            factors.setdefault(parsed[0], {})[parsed[1]] = info.shape
    return factors


def _checked_factors(path: Path, module: str, shapes: dict) -> tuple[int, int, int]:
    """``(r, k, d)`` of one module's factors: A (r, k) and B (d, r), both present."""
    a_shape, b_shape = shapes.get("lora_A"), shapes.get("lora_B")
    if a_shape is None or b_shape is None:
        missing = "lora_A" if a_shape is None else "lora_B"
        raise AdapterFileError(
            f"{path} has no {missing} tensor for module {module!r} (only its "
            f"{'lora_B' if a_shape is None else 'lora_A'}); the file is incomplete, re-save it."
        )
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise AdapterFileError(
            f"{path}: module {module!r} has lora_A {list(a_shape)} and lora_B {list(b_shape)}; "
            "expected (r, k) and (d, r) with the same r. The file is damaged; re-save it."
        )
    return a_shape[0], a_shape[1], b_shape[0]


def _fingerprint_summary(metadata: dict[str, str]) -> dict[str, Any]:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {"present": False}
    try:
        modules = json.loads(text)["modules"]
        dtypes = sorted({str(entry["dtype"]) for entry in modules.values()})
    except (ValueError, KeyError, TypeError, AttributeError):
        return {"present": True, "readable": False}
    return {"present": True, "readable": True, "modules": len(modules), "base_dtypes": dtypes}


def summarize_adapter(directory: str | Path, adapter_name: str = "default") -> dict[str, Any]:
    """A JSON-ready summary of the adapter in ``directory`` (see the module docstring)."""
    directory = adapter_directory(directory, adapter_name)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file() and (directory / PICKLE_NAME).is_file():
        raise pickle_refusal(directory / PICKLE_NAME)
    config_path = directory / CONFIG_NAME
    config = config_from_json(config_path.read_text(encoding="utf-8"), str(config_path))
    header = read_header(weights)
    factors = _factor_shapes(header.tensors)
    ranks, alphas, scalings = Counter(), Counter(), Counter()
    base_parameters = lora_parameters = 0
    for module, shapes in sorted(factors.items()):
        rank, in_features, out_features = _checked_factors(weights, module, shapes)
        alpha = config.alpha_for(module)
        ranks[rank] += 1
        alphas[alpha] += 1
        scalings[round(functional.scaling(rank, alpha, config.use_rslora), 6)] += 1
        base_parameters += out_features * in_features
        lora_parameters += functional.lora_parameter_count(out_features, in_features, rank)
    total = sum(info.numel for info in header.tensors.values())
    return {
        "directory": str(directory),
        "base_model": config.base_model_name_or_path,
        "fingerprint": _fingerprint_summary(header.metadata),
        "task_type": config.task_type,
        "target_modules": config.target_modules,
        "adapted_modules": len(factors),
        "module_types": sorted({module.rsplit(".", 1)[-1] for module in factors}),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "scalings": {f"{k:g}": v for k, v in sorted(scalings.items())},
        "use_rslora": config.use_rslora,
        "bias": config.bias,
        "modules_to_save": config.modules_to_save,
        "dtypes": dict(sorted(Counter(i.dtype for i in header.tensors.values()).items())),
        "parameters": total,
        "lora_parameters": lora_parameters,
        "other_parameters": total - lora_parameters,
        "file_bytes": header.file_size,
        "adapted_base_parameters": base_parameters,
        "compression_ratio": base_parameters / lora_parameters if lora_parameters else None,
    }
