"""What a user wants to know about an adapter before using it, from its config and the
safetensors HEADER only (no tensor is read, so it is instant for any file size).

Compression ratio: over the adapted matrices, ``sum d*k / sum r*(d+k)`` (the base parameters
the adapter changes, per trainable LoRA parameter; ``functional.lora_parameter_count``). A LoRA
layer on a bare parameter (``target_parameters``; its path, less any ``.base_layer``, ends in
the module part of an entry, or any path for an entry without one such as ``"down_proj"``,
unless ``target_modules`` names it) counts as E matrices of rank r, E = (rows of A) / r, where r and
alpha are those of the PARAMETER's path (``rank_pattern`` / ``alpha_pattern`` keys such as
``"down_proj"`` name the parameter, as ``load_adapter`` reads them). Several targeted parameters
of one module nest (``lorakit.parameter_targets``: the first in the module's order innermost,
``.base_layer`` deeper); the header does not say that order, so the parameters are matched to
the nested layers in the one order whose ranks fit the factors' rows with a common E (in
``target_parameters`` order where several fit).

Parameters: ``parameters`` counts the file's tensors less the full base weights of adapted
embeddings (``<path>.base_layer.weight``, PEFT's ``save_embedding_layers``: frozen base values,
not adapter parameters; ``saved_base_weights``) and the copies of saved-module tensors peft
writes and loading ignores (``keys.is_saved_module_alias``), so that it equals PEFT's
trainable count; ``file_parameters`` counts every tensor of the file.

Writer: ``peft_version`` (the file's; None where not recorded) and ``read_as_written``, one line
per ``modules_to_save`` entry / ``trainable_token_indices`` key that the writer's peft (< 0.22)
read otherwise than peft 0.22, with the modules ``load_adapter`` reads it as
(``io.writers_rules``); the config fields above are as written.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit import functional
from lorakit.errors import AdapterFileError
from lorakit.io import fingerprint_json
from lorakit.io.adapter_dirs import adapter_directory
from lorakit.io.config_json import (
    CONFIG_NAME,
    config_from_json,
    peft_only_base_init,
    read_config_text,
)
from lorakit.io.fingerprint import METADATA_KEY
from lorakit.io.header import TensorInfo, read_header
from lorakit.io.keys import (
    base_weight_module,
    is_magnitude_key,
    is_saved_module_alias,
    parse_lora_key,
)
from lorakit.io.read import read_adapter_header, weights_path
from lorakit.io.save import BASE_INIT_METADATA_KEY
from lorakit.io.tensors import TORCH_DTYPES
from lorakit.io.writers_rules import writers_rules
from lorakit.targets import matches

__all__ = ["summarize_adapter"]


def _factor_infos(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """``{module: {"lora_A": info, "lora_B": info}}`` from the header entries."""
    factors: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is not None:
            factors.setdefault(parsed[0], {})[parsed[1]] = info
    return factors


def _checked_factors(path: Path, module: str, infos: dict) -> tuple[int, int, int]:
    """``(r, k, d)`` of one module's factors: A (r, k) and B (d, r), both present, r >= 1,
    floating point."""
    a_info, b_info = infos.get("lora_A"), infos.get("lora_B")
    if a_info is None or b_info is None:
        missing = "lora_A" if a_info is None else "lora_B"
        raise AdapterFileError(
            f"{path} has no {missing} tensor for module {module!r} (only its "
            f"{'lora_B' if a_info is None else 'lora_A'}); the file is incomplete, re-save it."
        )
    a_shape, b_shape = a_info.shape, b_info.shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] < 1:
        raise AdapterFileError(
            f"{path}: module {module!r} has lora_A of shape {list(a_shape)} and lora_B of shape "
            f"{list(b_shape)}; expected (r, k) and (d, r) with the same r >= 1. The file is "
            "damaged; re-save it."
        )
    for role, info in (("lora_A", a_info), ("lora_B", b_info)):
        if not TORCH_DTYPES[info.dtype].is_floating_point:
            raise AdapterFileError(
                f"{path}: module {module!r} has a {role} of dtype {info.dtype}; LoRA factors are "
                "floating point. The file is damaged; re-save it."
            )
    return a_shape[0], a_shape[1], b_shape[0]


def _saved_base_weights(
    tensors: dict[str, TensorInfo], adapted: set[str], modules_to_save: list[str]
) -> int:
    """The numbers of the frozen base weights a file holds whole, not adapter parameters: the
    embedding matrices PEFT's ``save_embedding_layers`` saves (``keys.base_weight_module``:
    never a tensor of a module inside one that ``modules_to_save`` picks, a trained copy)."""
    return sum(
        info.numel
        for key, info in tensors.items()
        if base_weight_module(key, adapted, modules_to_save) is not None
    )


def _fingerprint_summary(metadata: dict[str, str]) -> dict[str, Any]:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {"present": False}
    try:
        modules = fingerprint_json.from_metadata(text, METADATA_KEY)
    except AdapterFileError:
        return {"present": True, "readable": False}
    dtypes = sorted({str(entry["dtype"]) for entry in modules.values()})
    return {"present": True, "readable": True, "modules": len(modules), "base_dtypes": dtypes}


def _on_parameter(config, module: str) -> bool:
    """Whether the LoRA layer at ``module`` adapts a bare parameter of ``config``'s
    ``target_parameters``: its owner (the path less any ``.base_layer``) is one an entry may
    name (``_owner_fits``) and is not a module that ``target_modules`` names."""
    owner = module.replace(".base_layer", "")
    entries = config.target_parameters or []
    if not any(_owner_fits(owner, entry) for entry in entries):
        return False
    return not matches(config.target_modules or [], owner)


def _owner_fits(owner: str, entry: str) -> bool:
    """Whether the module at ``owner`` may hold the parameter ``entry`` names: an entry with a
    module part (``experts.down_proj``) names modules whose path ends in it; one without
    (``down_proj``, as a converted MoE config holds) any module."""
    part = entry.rpartition(".")[0]
    return not part or owner == part or owner.endswith("." + part)


def _parameter_paths(
    config, modules: list[str], factors: dict[str, dict[str, TensorInfo]], path: Path
) -> dict[str, str]:
    """``{LoRA layer path: parameter path}`` for the layers of ``modules`` on bare parameters
    (the ``FileTensor.parameter`` of ``lorakit.io.file_tensors.adapter_file_tensors``)."""
    by_owner: dict[str, list[str]] = {}
    for module in modules:
        if _on_parameter(config, module):
            by_owner.setdefault(module.replace(".base_layer", ""), []).append(module)
    paths: dict[str, str] = {}
    for owner, layers in by_owner.items():
        layers.sort(key=lambda m: -m.count(".base_layer"))  # innermost (deepest) first
        names = []
        for entry in config.target_parameters or []:
            name = entry.rpartition(".")[2]
            if _owner_fits(owner, entry) and name not in names:
                names.append(name)
        rows = [factors[layer]["lora_A"].shape[0] for layer in layers]
        fitting = [
            order
            for order in itertools.permutations(names, len(layers))
            if _common_experts(config, owner, order, rows)
        ]
        if not fitting:
            raise AdapterFileError(
                f"{path}: the LoRA factors of {owner!r} ({len(layers)} layer(s) of "
                f"{rows} rows) fit none of the parameters {names} that target_parameters names "
                "there at the rank r / rank_pattern gives (E experts x r rows each); the config "
                "and the weights disagree, fix adapter_config.json or re-save the adapter."
            )
        paths.update(
            {layer: f"{owner}.{name}" for layer, name in zip(layers, fitting[0], strict=True)}
        )
    return paths


def _common_experts(config, owner: str, names: tuple[str, ...], rows: list[int]) -> bool:
    """Whether the layers' A rows are E * (rank of each parameter) for one E >= 1."""
    experts = set()
    for name, count in zip(names, rows, strict=True):
        rank = config.rank_for(f"{owner}.{name}")
        if count % rank:
            return False
        experts.add(count // rank)
    return len(experts) == 1


@dataclass
class _ModuleTally:
    """What the adapted modules add up to: how many have each rank, alpha and scaling
    ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); the base weights they adapt
    (``Σ E d k``, ``E`` experts of a bare parameter, else 1); their LoRA parameters
    (``Σ E r (d + k)``); and how many adapt bare parameters."""

    ranks: Counter = field(default_factory=Counter)
    alphas: Counter = field(default_factory=Counter)
    scalings: Counter = field(default_factory=Counter)
    base_parameters: int = 0
    lora_parameters: int = 0
    adapted_parameters: int = 0


def _tally_modules(
    config, factors: dict[str, dict[str, TensorInfo]], weights: Path
) -> _ModuleTally:
    """Check every module's factors (``_checked_factors``), map factors on bare parameters to
    their parameter (``_parameter_paths``) and tally them (``_ModuleTally``)."""
    tally = _ModuleTally()
    checked = {
        module: _checked_factors(weights, module, infos) for module, infos in factors.items()
    }
    parameters = _parameter_paths(config, sorted(factors), factors, weights)
    for module in sorted(factors):
        rank, in_features, out_features = checked[module]
        alpha, matrices = config.alpha_for(module), 1
        if module in parameters:  # E experts of the parameter's rank
            parameter = parameters[module]
            rows, rank, alpha = rank, config.rank_for(parameter), config.alpha_for(parameter)
            matrices, tally.adapted_parameters = rows // rank, tally.adapted_parameters + 1
        tally.ranks[rank] += 1
        tally.alphas[alpha] += 1
        tally.scalings[round(functional.scaling(rank, alpha, config.use_rslora), 6)] += 1
        tally.base_parameters += matrices * out_features * in_features
        tally.lora_parameters += matrices * functional.lora_parameter_count(
            out_features, in_features, rank
        )
    return tally


def _config_and_init(directory: Path, metadata: dict[str, str]) -> tuple[Any, bool | str]:
    """``(config, init)``: the config as ``load_adapter`` reads it (a config.json edited after
    saving yields to the copy in the weights file) and the ``init_lora_weights`` the adapter
    was made with (for an adapter lorakit saved unconverted, the one in the header
    ``metadata``). An unconverted CorDA / LoRA-GA file, which loading refuses, is described
    all the same: its config read with ``describing=True``, its init as the file says."""
    config_path = directory / CONFIG_NAME
    text = read_config_text(config_path)
    peft_only_init = peft_only_base_init(text)
    if peft_only_init is not None:
        return config_from_json(text, str(config_path), describing=True), peft_only_init
    config = read_adapter_header(directory).config
    return config, metadata.get(BASE_INIT_METADATA_KEY, config.init_lora_weights)


def summarize_adapter(directory: str | Path, adapter_name: str = "default") -> dict[str, Any]:
    """A JSON-ready summary of the adapter in ``directory`` (see the module docstring); an
    ``adapter_name`` other than "default" is read from ``directory/<name>``, where PEFT saves
    it beside "default"."""
    subfolder = None if adapter_name == "default" else adapter_name
    directory = adapter_directory(directory, adapter_name, subfolder=subfolder)
    weights = weights_path(directory)
    header = read_header(weights)
    config, init = _config_and_init(directory, header.metadata)
    factors = _factor_infos(header.tensors)
    tally = _tally_modules(config, factors, weights)
    base_parameters, lora_parameters = tally.base_parameters, tally.lora_parameters
    saved_base = _saved_base_weights(header.tensors, set(factors), config.modules_to_save or [])
    in_file = sum(info.numel for info in header.tensors.values())
    aliases = [key for key in header.tensors if is_saved_module_alias(key, header.tensors)]
    total = in_file - saved_base - sum(header.tensors[key].numel for key in aliases)
    return {
        "directory": str(directory),
        **writers_rules(directory),
        "base_model": config.base_model_name_or_path,
        "fingerprint": _fingerprint_summary(header.metadata),
        "task_type": config.task_type,
        "target_modules": config.target_modules,
        "target_parameters": config.target_parameters,
        "layer_replication": config.layer_replication,
        "adapted_modules": len(factors) - tally.adapted_parameters,
        "adapted_parameters": tally.adapted_parameters,
        "module_types": sorted(
            {m.rsplit(".", 1)[-1] for m in factors if not _on_parameter(config, m)}
        ),
        "ranks": {str(k): v for k, v in sorted(tally.ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(tally.alphas.items())},
        "scalings": {f"{k:g}": v for k, v in sorted(tally.scalings.items())},
        "use_rslora": config.use_rslora,
        "init_lora_weights": init,
        "use_dora": config.use_dora,
        "dora_magnitude_parameters": sum(
            info.numel for key, info in header.tensors.items() if is_magnitude_key(key)
        ),
        "bias": config.bias,
        "lora_bias": config.lora_bias,
        "trainable_token_indices": config.trainable_token_indices,
        "modules_to_save": config.modules_to_save,
        "dtypes": dict(sorted(Counter(i.dtype for i in header.tensors.values()).items())),
        "parameters": total,
        "lora_parameters": lora_parameters,
        "other_parameters": total - lora_parameters,
        "saved_base_weights": saved_base,
        "file_parameters": in_file,
        "file_bytes": header.file_size,
        "adapted_base_parameters": base_parameters,
        "compression_ratio": base_parameters / lora_parameters if lora_parameters else None,
    }
