"""``PeftModel.state_dict`` / ``load_state_dict`` that list a tied tensor once.

Why: transformers' ``Trainer`` saves a model that is neither a ``PreTrainedModel`` nor a
``peft.PeftModel`` (lorakit's front door is neither) with
``safetensors.torch.save_file(model.state_dict())``, and safetensors refuses tensors that share
memory. A base that ties its input embedding and ``lm_head`` (SmolLM2, Llama-3.2, Qwen2.5) has
one tensor under two keys (``model.model.embed_tokens.weight`` and ``model.lm_head.weight``), so
every checkpoint save crashed and left an empty ``checkpoint-N/``. transformers' own
``save_pretrained`` writes a tied weight once; so does this ``state_dict``, under the name
``named_parameters()`` keeps (the first one reached), and ``load_state_dict`` fills the dropped
name from its twin (in ``_load_from_state_dict``, which torch calls for every module loaded,
so also under a parent: DDP, ``torch.compile``), so a checkpoint loads back (strict or not;
``resume_from_checkpoint``, ``load_best_model_at_end``) and the tie survives (both names still
hold one parameter).
A dict holding both names (an older full ``torch.save(model.state_dict())``) loads unchanged.

PEFT's functions ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` live here too:
one adapter's tensors under the keys of its adapter file (``base_model.model.<path>.lora_A.weight``,
the adapter name left out), found by the save code's own table (``io.save.adapter_file_entries``,
``io.file_tensors.model_tensor``): the keys PEFT's function gives, which are those ``save_pretrained``
writes but for a targeted embedding's base weight (PEFT's ``save_embedding_layers="auto"``,
the function's default, adds it; lorakit's save does so only where the vocabulary was resized).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = [
    "PeftStateDictMixin",
    "fill_aliases",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "tied_aliases",
]


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: first_name}`` for every parameter or buffer of ``module`` reachable under
    several names (a tied ``lm_head.weight`` -> ``embed_tokens.weight``, a module shared by two
    parents); ``first_name`` is the one ``named_parameters()`` / ``named_buffers()`` keep."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def fill_aliases(state_dict: dict[str, Any], aliases: dict[str, str], prefix: str = "") -> None:
    """Add to ``state_dict`` (in place) each tied name under ``prefix`` it lacks, from a twin it
    holds (either way round)."""
    groups: dict[str, list[str]] = {}
    for alias, name in aliases.items():
        groups.setdefault(name, [name]).append(alias)
    for names in groups.values():
        keys = [prefix + name for name in names]
        present = next((key for key in keys if key in state_dict), None)
        if present is not None:
            for key in keys:
                state_dict.setdefault(key, state_dict[present])


class PeftStateDictMixin:
    """``state_dict`` without tied aliases, loading that accepts their absence (see the module
    docstring: transformers' ``Trainer`` checkpoints through safetensors)."""

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """``nn.Module.state_dict`` listing each tensor once, under its first name (also when
        a parent module's ``state_dict`` reaches this one, under its prefix)."""
        state = super().state_dict(  # type: ignore[misc]
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )
        prefix = args[1] if len(args) > 1 and not prefix else prefix  # (deprecated positional)
        for alias, name in tied_aliases(self).items():  # type: ignore[arg-type]
            if prefix + name in state:
                state.pop(prefix + alias, None)
        return state

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Fill the tied names ``state_dict`` lacks before ``nn.Module`` loads this module and
        its children from it: torch's ``load_state_dict`` calls this for every module of the
        tree (a parent's load too: DDP, ``torch.compile``, a value-head wrapper), each child
        then taking its keys from the dict filled here, so ``strict=True`` takes this model's
        ``state_dict()`` under any parent."""
        fill_aliases(state_dict, tied_aliases(self), prefix)  # type: ignore[arg-type]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]


# ---------------------------------------------------------------- PEFT's state-dict functions
def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """PEFT's ``get_peft_model_state_dict``: ``{file key: tensor}`` of adapter ``adapter_name``,
    the keys and values PEFT's function gives (``base_model.model.<path>.lora_A.weight``
    (r, k), ``...lora_B.weight`` (d, r), DoRA magnitudes, saved modules, token rows, biases of
    ``bias`` mode). The tensors are the model's own, detached (no copy; they follow training);
    one accelerate offloaded with the model (on the meta device, its value in its hook's map:
    before the first forward loads the adapter for good) is read with its module loaded by its
    hook for the read, as ``save_adapter`` reads it (``offloading.loaded_for_reading``).

    ``model``: a ``PeftModel`` or the model holding the adapters (``unwrap_compiled=True``: a
    ``torch.compile`` wrapper's ``_orig_mod``). ``state_dict``: take each tensor from this
    dict instead (``model.state_dict()``-like, e.g. gathered by DeepSpeed / FSDP), looked up
    under the names the model's own tensor has; a tensor it lacks is left out, as in PEFT.
    ``save_embedding_layers``: PEFT's (default ``"auto"``: a targeted embedding's base
    weight; True / False: every / no input-output embedding's base weight)."""
    from lorakit.io.file_tensors import model_tensor
    from lorakit.offloading import loaded_for_reading, offloaded_holders

    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    inner = _holder(model, adapter_name)
    entries = _file_entries(inner, adapter_name, save_embedding_layers)
    tensors = {entry.key: model_tensor(inner, entry, adapter_name) for entry in entries}
    if state_dict is None:
        offloaded = offloaded_holders(inner, [t for t in tensors.values() if t.is_meta])
        with loaded_for_reading(offloaded):  # (the loaded tensors: looked up within)
            return {e.key: model_tensor(inner, e, adapter_name).detach() for e in entries}
    names = _tensor_names(model)
    found = {}
    for key, tensor in tensors.items():
        name = next((n for n in names.get(id(tensor), ()) if n in state_dict), None)
        if name is not None:
            found[key] = state_dict[name]
    return found


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """PEFT's ``set_peft_model_state_dict``: copy the tensors of a dict with adapter-file keys
    (``get_peft_model_state_dict``'s, or an adapter file's; the ``base_model.model.`` prefix
    may be left out; a DoRA magnitude spelled ``<path>.lora_magnitude_vector`` or ``...
    lora_magnitude_vector.weight``, as peft reads both) into adapter ``adapter_name``, which
    the model must hold. Copied in place,
    cast to each tensor's dtype and device: ``requires_grad`` flags, and an optimizer's hold
    on the tensors, stay.

    Returns torch's ``(missing_keys, unexpected_keys)``, as PEFT's: ``missing_keys`` are the
    keys of ``model.state_dict()`` left as they were (the base model's, the other adapters',
    and this adapter's tensors the dict lacks, named with the adapter, e.g.
    ``...q_proj.lora_A.default.weight``); ``unexpected_keys`` the given keys that are no tensor
    of the adapter, as given. A tensor whose shape differs (another rank) is a ``ValueError``
    naming it before anything is copied (``ignore_mismatched_sizes=True``: left out with a
    warning and listed as missing, as in PEFT). Refused while the adapter is merged (its merged
    weight would keep the old values). ``low_cpu_mem_usage`` is accepted and has no effect.
    Tensors accelerate offloaded with the model (on the meta device: copied into, they kept
    nothing) are loaded for good first, as a forward loads them (``_load_offloaded``); a base
    tensor an offloaded module holds is written into its hook's offload map
    (``offloaded_tensors.write_offloaded``)."""
    from lorakit.io.file_tensors import model_tensor
    from lorakit.io.keys import PREFIX, canonical_keys
    from lorakit.offloaded_tensors import write_offloaded

    inner = _holder(model, adapter_name)
    entries = {entry.key: entry for entry in _file_entries(inner, adapter_name, True)}
    given = canonical_keys(  # (a DoRA magnitude in either spelling, as peft reads it)
        {key if key.startswith(PREFIX) else PREFIX + key: key for key in peft_model_state_dict}
    )
    unexpected = [key for file_key, key in given.items() if file_key not in entries]
    to_copy = {k: peft_model_state_dict[given[k]] for k in given if k in entries}
    _check_not_merged(inner, adapter_name, [entries[key] for key in to_copy])
    targets = {key: model_tensor(inner, entries[key], adapter_name) for key in to_copy}
    mismatched = {
        key: (tuple(value.shape), tuple(targets[key].shape))
        for key, value in to_copy.items()
        if tuple(value.shape) != tuple(targets[key].shape)
    }
    _refuse_or_warn_mismatched(mismatched, ignore_mismatched_sizes)
    _load_offloaded(inner, adapter_name)  # (the same Parameters, now with values)
    written = set()
    with torch.no_grad():
        for key, value in to_copy.items():
            if key not in mismatched:
                module = inner.get_submodule(entries[key].module)
                if not write_offloaded(module, targets[key], value):  # (an offloaded base's)
                    targets[key].copy_(value)
                written.add(id(targets[key]))
    missing = [name for name, t in model.state_dict(keep_vars=True).items() if id(t) not in written]
    return _IncompatibleKeys(missing, unexpected)


def _load_offloaded(model: nn.Module, adapter_name: str) -> None:
    """Load adapter ``adapter_name``'s tensors that accelerate offloaded with the model (added
    before it was offloaded) for good, as its first forward does: the LoRA layers' factors
    (``offloading.onload_for_good``), the ``modules_to_save`` copies and token rows
    (``ModulesToSave.load_offloaded_copies``)."""
    from lorakit.offloading import onload_for_good
    from lorakit.state import lora_layers, saved_modules

    for _, layer in lora_layers(model):
        if adapter_name in layer.ranks:
            onload_for_good(layer)
    for _, wrapper in saved_modules(model):
        wrapper.load_offloaded_copies()


def _holder(model: nn.Module, adapter_name: str) -> nn.Module:
    """The module holding ``model``'s adapters (a ``PeftModel``: the model inside);
    ``UnknownAdapterError`` naming the adapters when it lacks ``adapter_name``."""
    from lorakit.errors import UnknownAdapterError
    from lorakit.state import adapter_configs, adapter_model

    inner = adapter_model(model)
    known = list(adapter_configs(inner))
    if adapter_name not in known:
        raise UnknownAdapterError(
            f"unknown adapter {adapter_name!r}; this model has {known}: pass one of them as "
            "adapter_name."
        )
    return inner


def _file_entries(model: nn.Module, adapter_name: str, save_embedding_layers: bool | str | None):
    """The ``FileTensor`` entries of adapter ``adapter_name``'s file, as ``save_adapter`` lists
    them (the same code: ``adapter_file_entries``)."""
    from lorakit.io.save import _embeddings_to_save, adapter_file_entries
    from lorakit.state import adapter_configs

    config = adapter_configs(model)[adapter_name]
    embeddings = _embeddings_to_save(model, config, save_embedding_layers)
    return adapter_file_entries(model, adapter_name, embeddings)[0]


def _tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(tensor): its names in model.state_dict()}`` (tied tensors: every name)."""
    names: dict[int, list[str]] = {}
    named = chain(
        model.named_parameters(remove_duplicate=False),
        model.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        names.setdefault(id(tensor), []).append(name)
    return names


def _check_not_merged(model: nn.Module, adapter_name: str, entries: list) -> None:
    """``ValueError`` where copying ``entries`` (``FileTensor``) would leave a merged weight
    stale: adapter ``adapter_name`` merged anywhere, or a base tensor (a ``bias`` mode bias, an
    embedding's base weight) written while any adapter is merged."""
    from lorakit.state import lora_layers

    merged = [(name, layer.merged_adapters) for name, layer in lora_layers(model)]
    merged = [(name, names) for name, names in merged if names]
    own = [name for name, names in merged if adapter_name in names]
    bases = [entry.key for entry in entries if entry.role in ("bias", "base_weight")]
    if own or (bases and merged):
        what = f"adapter {adapter_name!r}" if own else f"{len(bases)} base tensor(s) ({bases[0]})"
        raise ValueError(
            f"cannot set {what} while adapters are merged (in {(own or [merged[0][0]])[0]!r}): "
            "the merged weights would keep the old values. Call unmerge_adapter() "
            "(lorakit.unmerge) first."
        )


def _refuse_or_warn_mismatched(
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], ignore: bool
) -> None:
    """``ValueError`` listing the tensors whose shape differs from the adapter's (given, model);
    with ``ignore`` (PEFT's ``ignore_mismatched_sizes``) a warning instead."""
    if not mismatched:
        return
    shown = "; ".join(f"{key}: {a} given, {b} in the model" for key, (a, b) in mismatched.items())
    if not ignore:
        raise ValueError(
            f"{len(mismatched)} tensor(s) do not fit the adapter (another rank or module?): "
            f"{shown}. Nothing was copied; pass ignore_mismatched_sizes=True to skip them."
        )
    warnings.warn(f"skipped tensors whose shape does not fit the adapter: {shown}", stacklevel=3)
