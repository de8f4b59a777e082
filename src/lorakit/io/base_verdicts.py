"""What a load does with a base-model fingerprint (``lorakit.io.fingerprint``): the one rule
that refuses an adapter saved on other base weights (``refuse_other_base``), and the one
warning for an adapter whose base cannot be fully checked (``unverified_note``), for every path
that loads one (``load_adapter``, the server and its mixtures, ``train --resume``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from torch import nn

from lorakit import quantized
from lorakit.errors import BaseModelMismatchError, listed
from lorakit.io.fingerprint import base_identity, first_mismatch, held_base_weight
from lorakit.layers import LoraLayer
from lorakit.layers.base import offload_hook
from lorakit.offloading import map_holds, parent_offloader

__all__ = ["refuse_other_base", "unverifiable", "unverified_note"]


def _unchecked(
    model: nn.Module,
    stored: dict[str, dict[str, object]],
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None,
) -> tuple[list[str], list[str]]:
    """``(uncovered, unreadable)`` of ``module_names``, which ``first_mismatch`` cannot check:
    uncovered, no stored fingerprint though the base weight is here; unreadable, the base
    weight is on the meta device with nothing to read it from (``offloaded_weight``), whether
    fingerprinted or not (``_readable``: an offloaded weight is not read for this)."""
    uncovered, unreadable = [], []
    for name in module_names:
        module = modules[name] if modules is not None else model.get_submodule(name)
        if not _readable(module):
            unreadable.append(name)
        elif name not in stored:
            uncovered.append(name)
    return uncovered, unreadable


def _readable(module: nn.Module) -> bool:
    """Whether ``first_mismatch`` can read the base weight of ``module`` (``base_identity``'s
    is not on the meta device), decided without reading an offloaded one: a weight on the meta
    device is readable where the offload hook of the module holding it has a value for it
    (``offloading.map_holds``: no "disk" file is read, which ``first_mismatch`` then reads
    once). A quantized base's packed codes are looked at as they are."""
    if quantized.is_quantized(module.base_layer if isinstance(module, LoraLayer) else module):
        return base_identity(module)[0].device.type != "meta"
    holder, weight = held_base_weight(module)
    if weight.device.type != "meta":
        return True
    hook = offload_hook(holder)
    return hook is not None and map_holds(hook.weights_map, "weight")


def unverifiable(
    model: nn.Module,
    stored: dict[str, dict[str, object]],
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None = None,
) -> list[str]:
    """Those of ``module_names`` (in their order) that ``first_mismatch`` cannot check: no
    stored fingerprint, or a base weight on the meta device with nothing to read it from (a
    model built on the meta device; an accelerate-offloaded weight is read, ``base_weight``)."""
    names = list(module_names)
    uncovered, unreadable = _unchecked(model, stored, names, modules)
    unchecked = set(uncovered) | set(unreadable)
    return [name for name in names if name in unchecked]


def unverified_note(
    model: nn.Module,
    stored: dict[str, dict[str, object]] | None,
    label: object,
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None = None,
) -> str | None:
    """The one warning for an adapter whose base ``refuse_other_base`` cannot fully check, for
    every path that loads one (``load_adapter``, the server, mixtures, ``--resume``); None when
    every one of ``module_names`` is checked (``unverifiable``).

    ``stored`` None (written by peft or another tool): ``adapter <label> has no base-model
    fingerprint ...``; else ``adapter <label> has a base-model fingerprint that does not cover
    N of its modules (<names>) ...`` and / or ``the base weights of N of its modules (<names>)
    are on the meta device ...`` (nothing to compare the fingerprint with).
    """
    if stored is None:
        return (
            f"adapter {label} has no base-model fingerprint (written by peft or another tool): "
            "lorakit cannot verify it was trained on this base model."
        )
    uncovered, unreadable = _unchecked(model, stored, module_names, modules)
    notes = []
    if uncovered:
        notes.append(
            f"adapter {label} has a base-model fingerprint that does not cover "
            f"{len(uncovered)} of its modules ({listed(uncovered, 3)}): lorakit cannot verify "
            "those were trained on this base model. Re-save the adapter from its base model "
            "(with the base weights in memory, not on the meta device) to record them."
        )
    under_parent = {name: parent_offloader(model, name) for name in unreadable}
    unmapped = [name for name in unreadable if under_parent[name] is None]
    if unmapped:
        notes.append(
            f"adapter {label}: the base weights of {len(unmapped)} of its modules "
            f"({listed(unmapped, 3)}) are on the meta device and no accelerate offload map "
            "holds them, so lorakit cannot verify the adapter was trained on this base model. "
            "Load the adapter once the base weights are loaded (or offloaded with accelerate) "
            "to check them."
        )
    if len(unmapped) < len(unreadable):
        notes.append(
            _parent_note(label, [n for n in unreadable if n not in unmapped], under_parent)
        )
    return " ".join(notes) or None


def _parent_note(label: object, names: list[str], under_parent: Mapping[str, str | None]) -> str:
    """``unverified_note``'s words for ``names``, whose base weights a PARENT module's
    accelerate hook offloads (``offloading.parent_offloader``: ``preload_module_classes``),
    in a map lorakit does not read."""
    parent = under_parent[names[0]]
    where = repr(parent) if parent else "the model itself"
    return (
        f"adapter {label}: the base weights of {len(names)} of its modules ({listed(names, 3)}) "
        f"are offloaded by accelerate through a hook on a parent module ({where}, e.g.: "
        "cpu_offload / dispatch_model with preload_module_classes), whose offload map lorakit "
        "does not read, so lorakit cannot verify the adapter was trained on this base model. "
        "Offload without preload_module_classes (each module then has its own offload map, "
        "which lorakit reads) to check them."
    )


def _named_bases(model: nn.Module, trained_on: str | None, local_paths: bool = True) -> str:
    """`` The adapter was saved for base model 'A'; this model is 'B'.``: the adapter config's
    ``base_model_name_or_path`` (``trained_on``) and the model's ``name_or_path`` (a
    transformers model's, from ``from_pretrained``), each where known; "" when neither is.
    ``local_paths`` False (an answer to an HTTP client): a name that is a local path
    (``_local_path``) is left out, and the same path for both is said without it."""
    loaded = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    loaded = loaded if isinstance(loaded, str) and loaded else None
    if not local_paths and trained_on and trained_on == loaded and _local_path(loaded):
        return (
            " The adapter was saved for the directory this model was loaded from (another "
            "revision, fine-tune or local change of it?)."
        )
    if not local_paths:
        trained_on = None if _local_path(trained_on) else trained_on
        loaded = None if _local_path(loaded) else loaded
    if trained_on and loaded:
        same = " (the same name: another revision, fine-tune or local change of it?)"
        tail = same if trained_on == loaded else ""
        return (
            f" The adapter was saved for base model {trained_on!r}; this model is {loaded!r}{tail}."
        )
    if trained_on:
        return f" The adapter was saved for base model {trained_on!r}."
    if loaded:
        return f" This model is {loaded!r}."
    return ""


def _local_path(name: str | None) -> bool:
    """Whether ``name`` is a path on this machine rather than a model's name (a Hub id or a
    built-in name): absolute, from ``~`` or ``.``, or an existing file or directory."""
    if not name:
        return False
    return os.path.isabs(name) or name.startswith(("~", ".")) or os.path.exists(name)


_WEIGHT_ONLY_FORMATS = ("int8-rows", "int4-groups")
_BNB_PREFIX = "bnb-"  # (bitsandbytes formats: "bnb-int8", "bnb-nf4-dq", ...)


def _float_under_bnb(
    model: nn.Module,
    stored: Mapping[str, Mapping[str, object]],
    module_names: Iterable[str],
    modules: Mapping[str, nn.Module] | None,
) -> tuple[str, str] | None:
    """``(module, reason)`` of the first of ``module_names`` saved on a bitsandbytes base that
    is float here because lorakit now puts it back in float after a bitsandbytes load
    (``weight_only.bitsandbytes_float_layers``: Gemma3n's AltUp coefficients), or None. Its
    float weight is the dequantized one, so its fingerprint fits, but the layer computes its
    output otherwise than the quantized layer the adapter was trained on."""
    from lorakit.quantized.weight_only import bitsandbytes_float_layers

    saved = [n for n in module_names if str(stored.get(n, {}).get("dtype")).startswith("bnb-")]
    kept = set(bitsandbytes_float_layers(model)) if saved else set()
    for name in (n for n in saved if n in kept):
        module = modules[name] if modules is not None else model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not quantized.is_quantized(base):
            return name, f"the adapter was trained on a {stored[name]['dtype']} layer, here float"
    return None


def _kept_float_under_bnb_note(model: nn.Module, name: str, stored_format: str) -> str:
    """Why ``name``, saved on a bitsandbytes ``stored_format`` base, is float here; else ""."""
    from lorakit.quantized.weight_only import bitsandbytes_float_layers

    if name not in bitsandbytes_float_layers(model):
        return ""
    return (
        f" lorakit now puts {name} back in float after a bitsandbytes load (transformers reads "
        "its weight itself), where the older lorakit that saved this adapter kept it "
        f"{stored_format}: train the adapter again on this base, or load it anyway with "
        "allow_base_mismatch=True (its outputs then differ from the trained ones by that "
        "format's matmul rounding)."
    )


def _kept_float_note(
    model: nn.Module, name: str, entry: dict[str, object], modules: Mapping[str, nn.Module] | None
) -> str:
    """Why a layer saved quantized by lorakit's ``int8-rows`` / ``int4-groups`` is float here,
    when lorakit now keeps it float on those bases (``weight_only.weight_reads``: Reformer's LSH
    ``query_key`` / ``value``, Gemma3n's AltUp coefficients), and what to do; else ""."""
    from lorakit.quantized.weight_only import weight_reads

    stored_format = str(entry.get("dtype"))
    module = modules[name] if modules is not None else model.get_submodule(name)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if stored_format.startswith(_BNB_PREFIX) and not quantized.is_quantized(base):
        return _kept_float_under_bnb_note(model, name, stored_format)
    if stored_format not in _WEIGHT_ONLY_FORMATS or quantized.is_quantized(base):
        return ""
    reader = next((cls for layer, cls, _ in weight_reads(model) if layer == name), None)
    if reader is None:
        return ""
    return (
        f" lorakit now keeps {name} float on an {stored_format} base (transformers' {reader} "
        "reads its weight itself), where the older lorakit that saved this adapter quantized "
        "it: train the adapter again on this base, or load it anyway with "
        f"allow_base_mismatch=True (this layer's float weight differs from its {stored_format} "
        "one by that format's rounding only)."
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
    trained_on: str | None = None,
    local_paths: bool = True,
) -> str | None:
    """The one rule for an adapter saved on other base weights, for every path that loads one.

    ``stored``: the fingerprint saved with the adapter in ``directory`` (None: written by peft
    or another tool, nothing to verify); ``module_names``: the modules to check
    (``first_mismatch``); ``trained_on``: the adapter config's ``base_model_name_or_path``,
    where the caller has it. When one does not fit, the message is ``adapter <directory> was
    trained on different base weights: module <m> does not match the fingerprint saved with
    the adapter (<reason>). The adapter was saved for base model <trained_on>; this model is
    <model.name_or_path>.`` (the names where known, ``_named_bases``; ``local_paths`` False
    leaves out a name that is a local path, for a server's answers): raised as
    ``BaseModelMismatchError`` with ``remedy`` (what the caller's user can do) appended, or,
    with ``allow_mismatch``, returned for the caller to warn with. None when the weights fit.
    """
    if stored is None:
        return None
    module_names = list(module_names)
    found = first_mismatch(model, stored, module_names, modules)
    found = found or _float_under_bnb(model, stored, module_names, modules)
    if found is None:
        return None
    module, reason = found
    message = (
        f"adapter {directory} was trained on different base weights: module {module!r} "
        f"does not match the fingerprint saved with the adapter ({reason})."
        f"{_kept_float_note(model, module, stored[module], modules)}"
        f"{_named_bases(model, trained_on, local_paths)}"
    )
    if not allow_mismatch:
        raise BaseModelMismatchError(f"{message} {remedy}")
    return message
