"""``adapter_config.json`` both ways, as PEFT writes and reads it.

Written: ``json.dumps(d, indent=2)`` with keys sorted, no trailing newline, lists sorted, pattern
dicts sorted unless that would change which key matches first for a module or a targeted bare
parameter (then in the order given),
``"all-linear"`` (and an unset ``target_modules``) expanded to the module names as PEFT does
(``io.written_targets``).
Read: ``peft_type`` must be "LORA"; the fields lorakit understands become a ``LoraConfig``;
PEFT fields that change the numbers in ways lorakit does not implement (QA-LoRA, ...) are
refused unless off, other PEFT fields are ignored (the table and the rule, shared with
``LoraConfig``: ``lorakit.peft_fields``); unknown keys are ignored with a warning; an
``init_lora_weights`` neither lorakit nor PEFT knows is refused, and so is an unconverted file
of a base-changing init lorakit cannot redo (CorDA, Astra, LoRA-GA:
``init_methods.PEFT_ONLY_BASE_CHANGING_INITS``), unless only described (``describing=True``,
``lorakit inspect``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.config import LoraConfig, pattern_key
from lorakit.config_checks import INIT_MODES
from lorakit.errors import AdapterFileError
from lorakit.fan_in_fan_out import fan_in_fan_out_flips
from lorakit.init_methods import canonical_init, changes_base, changes_base_in_peft_only
from lorakit.io.header import unreadable
from lorakit.io.older_peft_files import portable_entries
from lorakit.io.written_targets import written_target_modules
from lorakit.parameter_targets import find_parameter_targets
from lorakit.peft_fields import PEFT_LORA_FIELDS, file_refusal, first_refused_setting
from lorakit.state import adapter_configs
from lorakit.targets import model_modules, original_module

__all__ = [
    "config_from_json",
    "config_to_json",
    "peft_only_base_init",
    "read_config_text",
    "written_target_modules",
]

CONFIG_NAME = "adapter_config.json"

# LoraConfig fields stored under the same name in adapter_config.json.
_FIELDS = (
    "alpha_pattern",
    "base_model_name_or_path",
    "bias",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "init_lora_weights",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "modules_to_save",
    "r",
    "rank_pattern",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_dora",
    "use_rslora",
)
# PEFT's other inits that lorakit does not implement and that leave the base untouched: loading,
# PEFT only initialises the factors and the file's tensors overwrite them, so the file is a plain
# LoRA adapter (read as True; "nora": peft 0.22). (The base-changing ones: ``init_methods``.)
_PLAIN_ONCE_TRAINED_INITS = ("mica", "orthogonal", "nora")


def config_to_json(model: nn.Module, config: LoraConfig, adapter_modules: list[nn.Module]) -> str:
    """The text of ``adapter_config.json`` for ``config`` as adapted on ``model``.

    ``adapter_modules``: the base modules the adapter wraps (``fan_in_fan_out`` is written as
    PEFT leaves it after wrapping them: ``_written_fan_in_fan_out``).
    """
    values: dict[str, Any] = {name: getattr(config, name) for name in _FIELDS}
    if changes_base(config.init_lora_weights):  # peft would rerun it on the residual base
        values["init_lora_weights"] = True
    values["target_modules"] = written_target_modules(model, config)
    modules = list(model_modules(model))
    values["modules_to_save"], values["trainable_token_indices"] = portable_entries(
        config, (name for name, _ in modules)
    )  # (as peft before 0.22 reads them too)
    values["fan_in_fan_out"] = _written_fan_in_fan_out(model, config, adapter_modules, modules)
    values["base_model_name_or_path"] = config.base_model_name_or_path or (
        getattr(model, "name_or_path", None) or None
    )
    if config.exclude_modules is None:
        del values["exclude_modules"]  # a key older peft versions do not know
    if not config.lora_bias:
        del values["lora_bias"]  # likewise (peft < 0.14)
    if config.trainable_token_indices is None:
        del values["trainable_token_indices"]  # likewise
    if config.layer_replication is None:
        del values["layer_replication"]  # likewise (peft < 0.10)
    if config.target_parameters is None:
        del values["target_parameters"]  # likewise (peft < 0.17)
    if config.eva_config is None:
        del values["eva_config"]  # likewise (peft < 0.14)
    else:  # (PEFT reading a file without it warns and takes the default settings)
        values["eva_config"] = dataclasses.asdict(config.eva_config)
    values |= {
        "auto_mapping": _auto_mapping(model, config),
        "inference_mode": True,
        "peft_type": "LORA",
        "revision": None,
    }
    names = [name for name, _ in modules]
    # patterns see parameter paths too (the recorded config may be a file's: its rules)
    names += find_parameter_targets(model, config, file_config=True).values()
    for field_name in ("rank_pattern", "alpha_pattern"):
        values[field_name] = _pattern_in_file_order(values[field_name], names)
    return json.dumps(dict(sorted(values.items())), indent=2)


def _auto_mapping(model: nn.Module, config: LoraConfig) -> dict[str, str] | None:
    """PEFT's ``auto_mapping``: for a config without ``task_type``, the model's class and
    module, which ``peft.AutoPeftModel.from_pretrained`` needs to build the base (it refuses a
    task-less file without them: "Cannot infer the auto class"); None with a ``task_type``."""
    if config.task_type is not None:
        return None
    return {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}


def _written_fan_in_fan_out(
    model: nn.Module,
    config: LoraConfig,
    adapter_modules: list[nn.Module],
    modules: list[tuple[str, nn.Module]],
) -> bool:
    """``fan_in_fan_out`` as PEFT writes it: the config's, as PEFT's dispatch rewrites it on the
    layers it wraps, false after an ``nn.Linear`` and true after a transformers ``Conv1D``
    (``fan_in_fan_out.fan_in_fan_out_flips``). A config the model holds was settled so by its
    injection, which knows the layers it wrapped anew (a layer another adapter wrapped first
    leaves the flag alone, in PEFT too): its value as it is. Any other config (built for a
    file: a GGUF adapter's, a plan's, a conversion's) is settled here, on the adapted layers in
    model order (``modules``: ``model_modules``)."""
    if any(config is held for held in adapter_configs(model).values()):
        return config.fan_in_fan_out
    adapted = {id(original_module(m)) for m in adapter_modules}
    ordered = [(name, module) for name, module in modules if id(module) in adapted]
    flips = fan_in_fan_out_flips(config.fan_in_fan_out, ordered)
    return flips[-1][1] if flips else config.fan_in_fan_out


def _pattern_in_file_order(pattern: dict[str, Any], module_names: list[str]) -> dict[str, Any]:
    """``pattern`` with its keys sorted, unless sorting would change which key matches first
    for some name in ``module_names`` (the model's modules and the paths of the bare parameters
    ``target_parameters`` adapts; keys are regexes and the first match wins, in lorakit as in
    PEFT): then in the order given, so that every reader resolves each module's rank/alpha as
    the adapter was trained. Both orders are deterministic."""
    ordered = dict(sorted(pattern.items()))
    if all(pattern_key(ordered, name) == pattern_key(pattern, name) for name in module_names):
        return ordered
    return dict(pattern)


def read_config_text(path: Path) -> str:
    """The text of ``adapter_config.json`` at ``path``; ``AdapterFileError`` if it cannot be read
    or is not UTF-8 (JSON files are UTF-8, and PEFT writes them so)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise unreadable(path, error) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterFileError(
            f"{path} is not UTF-8 text (byte {error.start}); it is not a JSON file written by "
            "peft or lorakit. Fix or re-save the adapter."
        ) from None


def peft_only_base_init(text: str) -> str | None:
    """The ``init_lora_weights`` of ``adapter_config.json`` text when it is a base-changing init
    lorakit cannot redo (``changes_base_in_peft_only``: CorDA, LoRA-GA), else None (also for
    text that is not a JSON object: ``config_from_json`` says what is wrong with it)."""
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        return None
    init = values.get("init_lora_weights") if isinstance(values, dict) else None
    return init if changes_base_in_peft_only(init) else None


def config_from_json(text: str, source: str, *, describing: bool = False) -> LoraConfig:
    """Parse ``adapter_config.json`` text into a ``LoraConfig``; ``source`` names the file in
    errors. Raises ``AdapterFileError`` for anything lorakit cannot load faithfully.

    ``describing``: the config is only described, never loaded (``lorakit inspect``), so an
    unconverted CorDA / LoRA-GA file is read with init_lora_weights True instead of refused
    (``peft_only_base_init`` gives its init)."""
    values = _json_object(text, source)
    peft_type = values.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(
            f"{source} has peft_type={peft_type!r}; lorakit loads LoRA adapters only "
            '(peft_type "LORA").'
        )
    refused = first_refused_setting(values)
    if refused is not None:
        raise AdapterFileError(file_refusal(source, refused, values[refused]))
    unknown = sorted(set(values) - set(_FIELDS) - set(PEFT_LORA_FIELDS))
    if unknown:
        warnings.warn(
            f"{source}: ignoring keys lorakit does not know (from a newer PEFT?): {unknown}",
            stacklevel=3,
        )
    fields = {name: values[name] for name in _FIELDS if name in values}
    for name in ("r", "lora_alpha"):
        if name not in fields:
            raise AdapterFileError(f"{source} has no {name!r}; the adapter cannot be loaded.")
    init = fields.get("init_lora_weights", True)
    if describing and changes_base_in_peft_only(init):
        init = True  # (the caller reports the file's init: ``peft_only_base_init``)
    fields["init_lora_weights"] = _read_init(init, source)
    for name in ("rank_pattern", "alpha_pattern"):
        if fields.get(name) is None:
            fields[name] = {}
    if fields.get("use_dora") and changes_base(fields["init_lora_weights"]):
        raise AdapterFileError(
            f"{source} was saved unconverted with init_lora_weights="
            f"{fields['init_lora_weights']!r} and use_dora=true: loading it means redoing that "
            "initialisation with DoRA, which lorakit does not implement; load it with peft."
        )
    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{source}: {error}") from None


def _json_object(text: str, source: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; ``AdapterFileError`` naming ``source`` otherwise."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            f"{source} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}); fix or re-save the adapter."
        ) from None
    except ValueError as error:  # an integer of more than 4300 digits (Python's int limit)
        raise AdapterFileError(
            f"{source} is not valid JSON ({error}); fix or re-save the adapter."
        ) from None
    except RecursionError:
        raise AdapterFileError(f"{source}: the JSON is nested too deeply to be a config.") from None
    if not isinstance(values, dict):
        raise AdapterFileError(f"{source} must hold a JSON object, not {type(values).__name__}.")
    return values


def _read_init(init: Any, source: str) -> bool | str:
    """The ``init_lora_weights`` of a file as lorakit's config takes it: PEFT's spelling read
    as PEFT reads it (``canonical_init``); an init that only set the starting factors becomes
    True (the file's tensors replace them); one that rewrote the base stays, so that loading
    rewrites it too. ``AdapterFileError`` for CorDA and LoRA-GA (they rewrote the base from
    data lorakit does not have: ``changes_base_in_peft_only``) and for a value PEFT does not
    know either (it fails on it: "Unknown initialization")."""
    init = canonical_init(init)
    if changes_base_in_peft_only(init):
        raise AdapterFileError(
            f"{source} has init_lora_weights={init!r}: this initialisation changes the base "
            "weights (W_res = W0 - s B0 A0, from data lorakit does not have), so the adapter "
            "only fits that changed base, and lorakit cannot redo it. Convert it with peft "
            "first: save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter "
            "saved right after the init>), which makes it a plain LoRA adapter for the original "
            "base."
        )
    if changes_base(init) or init in INIT_MODES:
        return init
    if init in _PLAIN_ONCE_TRAINED_INITS:
        return True
    raise AdapterFileError(
        f"{source} has init_lora_weights={init!r}, which neither lorakit nor PEFT knows (PEFT "
        'fails on it too); expected true, false, "gaussian", "eva", "pissa", "pissa_niter_K", '
        '"olora", "loftq", "orthogonal", "corda", "astra", "lora_ga", "mica" or "nora". Fix the '
        "file."
    )
