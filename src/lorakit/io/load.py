"""Load an adapter file into a model: check everything first, then change the model.

Order: read the config and the safetensors header (``read_adapter_header``) -> work out which
tensors the config implies for this model (``load_plan.load_targets``) -> refuse a target that
cannot take the adapter (``load_checks.check_targets_take``: layer kind, DoRA support) -> refuse missing or
unexpected keys, wrong shapes or dtypes, a rank that disagrees with the config, all from the
header (``load_checks.check_tensors``) -> only then read the tensor data
(``read_adapter_data``) -> refuse non-finite or absurd values, a base whose fingerprint differs
(``base_checks.check_base``) -> only then inject the adapter and copy the tensors in. Any
failure after injection rolls the model back to exactly what it was.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorakit.base_rewrite import interrupts_held, write_rewrites
from lorakit.errors import AdapterFileError
from lorakit.inject import add_adapter_to_modules
from lorakit.inject_checks import check_adapter_name, check_one_bias_adapter
from lorakit.io.adapter_dirs import adapter_directory
from lorakit.io.base_checks import check_base
from lorakit.io.file_tensors import model_tensor
from lorakit.io.init_redo import check_init_redo, plan_redo
from lorakit.io.load_checks import check_targets_take, check_tensors
from lorakit.io.load_plan import LoadTargets, load_targets
from lorakit.io.load_rollback import merge_again, roll_back
from lorakit.io.moe_files import file_keys, fuse_expert_tensors
from lorakit.io.older_peft_files import with_writers_rules
from lorakit.io.read import AdapterFile, AdapterHeader, read_adapter_data, read_adapter_header
from lorakit.io.save import recorded_prompt_style
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.offloaded_tensors import restore_maps, write_offloaded
from lorakit.parameter_targets import parameter_stand_ins
from lorakit.replication import replicate_layers, restore_layers
from lorakit.state import (
    active_adapters,
    adapter_configs,
    adapter_model,
    lora_layers,
    state_of,
    walk_modules,
)
from lorakit.targets import original_module

__all__ = ["load_adapter"]


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    allow_base_mismatch: bool = False,
    activate: bool = False,
    adapter_dtype: torch.dtype | None = None,
    subfolder: str | None = None,
) -> nn.Module:
    """Load the adapter in ``directory`` (or ``directory/subfolder``) as ``adapter_name``.

    As in PEFT the name does not pick a subdirectory: an adapter saved as "other" beside
    "default" (in ``directory/other``) loads with ``subfolder="other"``.

    The adapter is injected from the file's config (the model may have no adapters yet, or
    others). It becomes active if it is the model's first adapter or ``activate`` is set.
    ``adapter_dtype``: dtype of the adapter tensors in the model (default: float32 on a
    float16/bfloat16 base, else the base dtype), whatever the file's dtype.
    Raises ``AdapterFileError`` (keys, shapes, values, files) or ``BaseModelMismatchError``
    (the base weights differ from those the adapter was saved with; override with
    ``allow_base_mismatch=True``). On any error the model is left unchanged.
    A path ending in ``.gguf`` is a llama.cpp LoRA file (``lorakit.export.gguf_read``).
    """
    wrapper, model = model, adapter_model(model)  # a PeftModel: the model inside holds them
    if os.fspath(directory).endswith(".gguf"):
        from lorakit.export.gguf_read import load_gguf_adapter

        options = dict(allow_base_mismatch=allow_base_mismatch, activate=activate)
        return load_gguf_adapter(
            model, directory, adapter_name, adapter_dtype=adapter_dtype, **options
        )
    if adapter_name in adapter_configs(model):
        raise AdapterFileError(
            f"the model already has an adapter named {adapter_name!r}; load under another "
            "adapter_name, or remove it first with lorakit.delete_adapter(model, name)."
        )
    check_adapter_name(model, adapter_name)
    header = read_adapter_header(adapter_directory(directory, adapter_name, subfolder=subfolder))
    check_one_bias_adapter(model, adapter_name, header.config.bias)
    replicated = _replicate(model, header)
    try:
        _load_checked(model, header, adapter_name, allow_base_mismatch, activate, adapter_dtype)
    except BaseException:
        if replicated:
            restore_layers(model)
        raise
    return wrapper


def _replicate(model: nn.Module, header: AdapterHeader) -> bool:
    """The config's ``layer_replication`` applied to ``model`` (True if it changed it)."""
    layer_map = header.config.layer_replication
    if not layer_map:
        return False
    try:
        return replicate_layers(model, layer_map)
    except ValueError as error:
        message = f"adapter {header.directory} does not fit this model: {error}"
        raise AdapterFileError(message) from None


def _load_checked(
    model: nn.Module,
    header: AdapterHeader,
    adapter_name: str,
    allow_base_mismatch: bool,
    activate: bool,
    adapter_dtype: torch.dtype | None,
) -> None:
    """``load_adapter`` once the header is read (and the layers replicated, if asked)."""
    current = dict(walk_modules(model))  # LoRA layers as they are, for adding the adapter
    modules = {name: original_module(module) for name, module in current.items()}
    header = with_writers_rules(header, modules)  # a file of peft < 0.22: its name rules
    to_load = load_targets(model, header, modules)
    check_targets_take(model, to_load, current, adapter_name)
    check_init_redo(to_load, current)
    check_tensors(
        to_load.header, to_load.config, to_load.tensors, modules
    )  # from the header: no data read yet
    adapter = read_adapter_data(header)
    keys = [entry.key for entry in to_load.tensors]
    conversion = to_load.expert_conversion
    adapter.require_finite(keys if conversion is None else file_keys(conversion, keys))
    if conversion is not None:  # a transformers-4 per-expert MoE file, fused as PEFT does
        adapter.tensors = fuse_expert_tensors(adapter.tensors, conversion)
        adapter.fingerprint = None  # recorded on its transformers-4 module paths
    replaced = {
        e.module for e in to_load.tensors if e.role == "base_weight"
    }  # the file brings these
    adapted = [e.module for e in to_load.tensors if e.role == "lora_A"]
    fingerprinted = _fingerprinted_modules(current, modules)
    with_parameters = fingerprinted | parameter_stand_ins(to_load.parameter_targets, current)
    check_base(model, adapter, adapted, replaced, allow_base_mismatch, with_parameters)
    _apply(model, adapter, to_load, current, adapter_name, activate, adapter_dtype)


def _fingerprinted_modules(
    current: dict[str, nn.Module], modules: dict[str, nn.Module]
) -> dict[str, nn.Module]:
    """``{name: module}`` whose base weight the fingerprint check reads: the LoRA layer itself
    where there is one (its ``original_weight`` is ``W0`` even while other adapters are merged,
    the weight a save fingerprints), else the module of ``modules``. The module a merged layer
    wraps holds ``W0 + s B A``, which no saved fingerprint fits."""
    return {
        name: layer if isinstance(layer, LoraLayer) else modules[name]
        for name, layer in current.items()
    }


def _lora_factors(adapter: AdapterFile, to_load: LoadTargets) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A": A (r, k), "lora_B": B (d, r)}}``: the file's LoRA factors of the
    modules to load (the tensors themselves, not copies)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for entry in to_load.tensors:
        if entry.role in ("lora_A", "lora_B"):
            factors.setdefault(entry.module, {})[entry.role] = adapter.tensors[entry.key]
    return factors


def _copy_other_tensors(
    model: nn.Module,
    adapter: AdapterFile,
    to_load: LoadTargets,
    adapter_name: str,
    base_backup: list[tuple[torch.Tensor, torch.Tensor]],
    map_backup: list[tuple[object, object]],
) -> None:
    """Copy every tensor of the file but the LoRA factors into the injected adapter (cast to
    the target's dtype); base tensors (biases, base weights) are the unmerged ones, each backed
    up first in ``base_backup`` as ``(tensor, old value)``, so a failure part-way can put them
    back; one accelerate offloaded is written into its hook's offload map instead
    (``offloaded_tensors.write_offloaded``; ``(hook, old map)`` in ``map_backup``).
    Saved-module and token copies train only when the adapter is active."""
    trainable = adapter_name in active_adapters(model)
    with torch.no_grad():
        for entry in to_load.tensors:
            if entry.role in ("lora_A", "lora_B"):
                continue
            target = model_tensor(model, entry, adapter_name)  # a base: the unmerged one
            if entry.role in ("bias", "base_weight"):
                module, value = model.get_submodule(entry.module), adapter.tensors[entry.key]
                if written := write_offloaded(module, target, value):
                    map_backup.append(written)  # (on meta: a copy would write nothing)
                    continue
                base_backup.append((target, target.detach().clone()))
            target.copy_(adapter.tensors[entry.key].to(target.dtype))
            if entry.role in ("saved", "tokens"):
                target.requires_grad_(trainable)


def _apply(
    model: nn.Module,
    adapter: AdapterFile,
    to_load: LoadTargets,
    current: dict[str, nn.Module],
    adapter_name: str,
    activate: bool,
    adapter_dtype: torch.dtype | None,
) -> None:
    """Inject (the LoRA factors are handed over, not copied) and copy the rest; on any failure
    put the model back exactly as it was."""
    had_state = state_of(model) is not None
    wrapped_before = {id(m) for m in current.values() if isinstance(m, (LoraLayer, ModulesToSave))}
    base_backup: list[tuple[torch.Tensor, torch.Tensor]] = []  # (base tensor, its old value)
    map_backup: list[tuple[object, object]] = []  # (offload hook, its old map)
    remerge: list[tuple[LoraLayer, tuple[str, ...]]] = []  # (merged layer, its merged adapters)
    factors = _lora_factors(adapter, to_load)
    try:
        add_adapter_to_modules(
            model,
            to_load.config,
            adapter_name,
            to_load.targets,
            to_load.saved_names,
            modules=current,
            parameter_targets=to_load.parameter_targets,
            factors={name: (pair["lora_A"], pair["lora_B"]) for name, pair in factors.items()},
            adapter_dtype=adapter_dtype,
            activate=activate,
            init=None,  # every other adapter tensor is copied from the file below
        )
        rewrites = plan_redo(model, to_load, adapter_name)
        _copy_other_tensors(model, adapter, to_load, adapter_name, base_backup, map_backup)
        remerge = _merged_over(model, [target for target, _ in base_backup])
        merge_again(remerge)  # their merged weights, from the base tensors the file brought
    except BaseException:
        roll_back(model, adapter_name, had_state, wrapped_before, base_backup, remerge)
        restore_maps(map_backup)
        raise
    replaced = {entry.module for entry in to_load.tensors if entry.role == "base_weight"}
    rewrites = [rewrite for rewrite in rewrites if rewrite.name not in replaced]  # as in PEFT:
    with interrupts_held():  # the file's base weight wins; a Ctrl-C lands once the load is done
        try:
            write_rewrites(rewrites)  # last: on a failure it puts back what it wrote
        except BaseException:
            roll_back(model, adapter_name, had_state, wrapped_before, base_backup, remerge)
            restore_maps(map_backup)
            raise
    style = recorded_prompt_style(adapter.metadata)  # (lorakit train's record; kept on save)
    if style is not None:
        state_of(model).prompt_styles[adapter_name] = style


def _merged_over(
    model: nn.Module, written: list[torch.Tensor]
) -> list[tuple[LoraLayer, tuple[str, ...]]]:
    """``(layer, its merged adapters)`` for each LoRA layer of ``model`` holding merged
    adapters whose ORIGINAL weight or bias (the tensor a merge starts from, which a load
    writes a file's base tensor into) is one of ``written``, tied weights included: its
    merged weight must be derived again."""
    if not written:
        return []
    ids = {id(tensor) for tensor in written}
    found = []
    for _, layer in lora_layers(model):
        originals = (layer.original_weight, getattr(layer, "original_bias", None))
        if layer.merged_adapters and any(id(t) in ids for t in originals if t is not None):
            found.append((layer, layer.merged_adapters))
    return found
