"""PEFT's load of a file saved without conversion whose init rewrites the base: PEFT runs the
init again on each target's base before it loads the file's A and B, and so does lorakit.

- PiSSA / OLoRA: the base becomes ``W0 - s B0 A0`` from the init's own factors;
- LoftQ: the base becomes LoftQ's ``Q`` (``init_factors.loftq_factors`` with the file's
  ``loftq_config``; the same bits as peft 0.22's ``loftq_init``), where the target is a float
  ``nn.Linear`` / ``Conv1D``. A weight already on the quantization grid (the saved ``Q``
  itself) is left as it is, which is what the rerun gives there (``init_factors.loftq_keeps``);
  a quantized target is left as it is too (it holds the quantized base the adapter was trained
  on; peft fails there), and so is an embedding or a convolution (peft gives those the default
  init under LoftQ, leaving their base).

``init_to_redo`` says which init a file asks for, ``check_init_redo`` refuses, before anything
changes, a file lorakit cannot treat as PEFT does, and ``plan_redo`` plans the rewrites
(``lorakit.base_rewrite``) once the adapter is injected.
"""

from __future__ import annotations

import json

from torch import nn

from lorakit import quantized
from lorakit.base_rewrite import BaseRewrite, plan_rewrite
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError
from lorakit.init_checks import check_layer_takes, check_redo_on_load
from lorakit.init_factors import loftq_keeps
from lorakit.init_methods import LoftQConfig, changes_base
from lorakit.io.load_plan import LoadTargets
from lorakit.layers import LoraLinear, layer_class_for
from lorakit.moe_entries import file_peft_version

__all__ = ["check_init_redo", "init_to_redo", "plan_redo"]


def init_to_redo(config: LoraConfig) -> str | None:
    """The PiSSA / OLoRA / LoftQ init PEFT reruns when it loads a file saying so (None for any
    other: lorakit writes ``true`` for its own such adapters)."""
    init = config.init_lora_weights
    return init if changes_base(init) else None


def check_init_redo(to_load: LoadTargets, current: dict[str, nn.Module]) -> None:
    """``AdapterFileError`` (before anything changes) when the file asks for a base-changing
    init that lorakit cannot redo exactly as PEFT does on some target it rewrites."""
    init = init_to_redo(to_load.config)
    if init is None:
        return
    header = to_load.header
    written_by = file_peft_version(header.config_text) if header is not None else None
    try:
        for name in _rewritten(to_load, current):
            module = current[name]
            check_layer_takes(layer_class_for(module, name), module, name, init)
            check_redo_on_load(init, module, name, written_by)
            _refuse_offloaded(module, name, init)
        if to_load.parameter_targets:
            raise ValueError(
                f"init_lora_weights={init!r} on target_parameters: lorakit implements it for "
                "nn.Linear and Conv1D modules only."
            )
    except ValueError as error:
        raise AdapterFileError(f"adapter {to_load.source}: {error}") from None


def plan_redo(model: nn.Module, to_load: LoadTargets, adapter_name: str) -> list[BaseRewrite]:
    """The rewrites of PEFT's load (module docstring), planned on the injected adapter's layers
    (the factorisations), written by ``write_rewrites`` once everything else is in place; the
    file's factors stay."""
    init = init_to_redo(to_load.config)
    if init is None:
        return []
    layers = {name: model.get_submodule(name) for name in to_load.targets}
    loftq = _loftq_settings(to_load) if init == "loftq" else None
    return [
        plan_rewrite(layers[name], name, adapter_name, init, loftq)
        for name in _rewritten(to_load, layers)
    ]


def _rewritten(to_load: LoadTargets, modules: dict[str, nn.Module]) -> list[str]:
    """The targets whose base the init rewrites: all of them for PiSSA / OLoRA; for LoftQ the
    float ``nn.Linear`` / ``Conv1D`` ones whose weight is not on its grid already (an offloaded
    one, whose weight is on the meta device, counts as rewritten: ``check_init_redo`` refuses
    it)."""
    if to_load.config.init_lora_weights != "loftq":
        return list(to_load.targets)
    floats = [name for name in to_load.targets if _float_linear(modules[name], name)]
    if not floats:
        return []  # (a quantized base: the file's settings are not needed)
    bits = _checked_bits(to_load, _loftq_settings(to_load).loftq_bits)
    weights = {name: _weight_dk(modules[name]) for name in floats}
    return [  # (offloaded, on meta: refused by the checks)
        name for name in floats if weights[name].is_meta or not loftq_keeps(weights[name], bits)
    ]


def _refuse_offloaded(module: nn.Module, name: str, init: str) -> None:
    """``ValueError`` when the base weight of ``module`` is offloaded by accelerate (on the
    meta device outside its forward): the init reads and rewrites its values."""
    if _weight_dk(module).is_meta:
        raise ValueError(
            f"init_lora_weights={init!r}: peft reruns this init on each target's base weight "
            f"when it loads the file, and the base weight of {name!r} is offloaded by "
            "accelerate (on the meta device). Load the base without offloading the targeted "
            "modules, or load it onto the base the init left (the residual model; for LoftQ "
            "the quantized one) after setting init_lora_weights to true in its "
            "adapter_config.json."
        )


def _float_linear(module: nn.Module, name: str) -> bool:
    """``module`` (or the base of the LoRA layer it is) is an unquantized ``nn.Linear`` /
    ``Conv1D``, whose base LoftQ rewrites."""
    base = getattr(module, "base_layer", module)
    if quantized.is_quantized(base) or quantized.looks_quantized(base) is not None:
        return False
    try:
        return layer_class_for(module, name) is LoraLinear
    except (TypeError, ValueError):
        return False  # (the load's other checks name it)


def _weight_dk(module: nn.Module):
    """The base weight of ``module`` as (d, k) (a ``Conv1D`` stores it transposed)."""
    base = getattr(module, "base_layer", module)
    return base.weight.t() if getattr(base, "nf", None) is not None else base.weight


def _checked_bits(to_load: LoadTargets, bits: int) -> int:
    """``bits``, once bitsandbytes (LoftQ's quantizer) is known to be installed; else an
    ``AdapterFileError`` naming the file and the ways out."""
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise AdapterFileError(
            f"adapter {to_load.source} has init_lora_weights='loftq': peft reruns LoftQ on the "
            "base when it loads it, and so does lorakit, with bitsandbytes' quantizer, which is "
            "not installed. Install bitsandbytes (pip install bitsandbytes), or load it onto "
            "the quantized base it was trained on after setting init_lora_weights to true in "
            "its adapter_config.json."
        ) from None
    return bits


def _loftq_settings(to_load: LoadTargets) -> LoftQConfig:
    """The file's ``loftq_config`` (``loftq_bits``, ``loftq_iter``), read from its
    ``adapter_config.json`` text; ``AdapterFileError`` when it is missing (peft refuses such a
    config too) or invalid."""
    text = to_load.header.config_text if to_load.header is not None else ""
    try:
        settings = json.loads(text or "{}").get("loftq_config")
    except (ValueError, RecursionError, AttributeError):
        settings = None
    if not isinstance(settings, dict) or not settings:
        raise AdapterFileError(
            f"adapter {to_load.source} has init_lora_weights='loftq' but no loftq_config: peft "
            "refuses such a config, and the LoftQ it reruns on load needs its loftq_bits and "
            'loftq_iter. Add them to its adapter_config.json, e.g. "loftq_config": '
            '{"loftq_bits": 4, "loftq_iter": 1}, as the adapter was initialised.'
        )
    known = {key: settings[key] for key in ("loftq_bits", "loftq_iter") if key in settings}
    try:
        return LoftQConfig(**known)
    except ValueError as error:
        raise AdapterFileError(f"adapter {to_load.source}: loftq_config: {error}") from None
