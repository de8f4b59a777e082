"""Accelerate offloading beyond one layer's own base weight (``layers.base.offload_hook``).

- A hook on a PARENT module that offloads the weights of all its submodules at once
  (``cpu_offload`` / ``dispatch_model`` with ``preload_module_classes``: an ``AlignDevicesHook``
  with ``offload=True`` and ``place_submodules=True``): no adapter can sit under it, and
  ``inject`` / ``load_adapter`` refuse it before any change (``check_no_parent_offload``).
- Adapter tensors offloaded too (a model offloaded AFTER its adapters were added: accelerate
  hooks ``lora_A`` / ``lora_B`` like any module holding weights): read on the meta device,
  torch computes with uninitialised memory, silently. The forward loads a LoRA layer's adapter
  modules for good (``onload_for_good``: in the Parameters the model already holds, so an
  optimizer made before the first forward trains them), as an adapter added after offloading
  lives on the execution device, and so do ``modules_to_save`` copies and token rows
  (``load_for_good``); a save reads offloaded tensors with their modules loaded for the read
  (``offloaded_holders``, ``loaded_for_reading``): the file is the plain model's. A base bias
  that a ``bias`` mode trains stays offloaded with its module: a forward that records
  gradients while an adapter of the call trains it is refused
  (``offloaded_tensors.guard_trained_biases``), and ``inject``
  refuses, before any change, an adapter whose ``bias`` mode trains the bias of a module
  accelerate offloaded, targeted or not (``check_no_offloaded_bias``).
- Whether an offload map holds a readable value for a key, without reading it (``map_holds``:
  a "disk" entry is read whole from its file; ``io.base_verdicts``).
- A bitsandbytes layer accelerate offloaded: its quantization state does not survive the
  offload map (the plain model itself fails there), so ``inject`` / ``load_adapter`` refuse it
  (``check_no_offloaded_bnb``; lorakit's own int8-rows / int4-groups layers and torchao's
  int8 weight-only ones work offloaded: ``quantized.torchao.base_forward`` loads its weight
  through the hook for the call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "check_no_offloaded_bias",
    "check_no_offloaded_bnb",
    "check_no_parent_offload",
    "hooked_modules",
    "load_for_good",
    "loaded_for_reading",
    "map_holds",
    "offloaded_holders",
    "offloaded_output",
    "onload_for_good",
    "parent_offloader",
]


def parent_offloader(model: nn.Module, name: str) -> str | None:
    """The path of the nearest module strictly above ``name`` in ``model`` whose accelerate hook
    offloads the weights of all its submodules (``offload_hook`` with ``place_submodules``), or
    None. Such a hook loads ``<child path>.<tensor>`` from its map for each call and puts every
    tensor under it (adapter factors too) back on the meta device after it: a LoRA layer or a
    trained copy there renames the weights it loads (a ``KeyError`` at the first forward)."""
    from lorakit.layers.base import offload_hook  # (lorakit.layers.base imports this module)

    parts = name.split(".") if name else []
    for end in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:end])
        hook = offload_hook(model.get_submodule(path))
        if hook is not None and getattr(hook, "place_submodules", False):
            return path
    return None


def check_no_parent_offload(model: nn.Module, names: Sequence[str]) -> None:
    """``ValueError`` naming the first of ``names`` (targets, ``modules_to_save``, trainable
    token embeddings) that lies under a parent's offloading hook (``parent_offloader``), with
    the way out; changes nothing. A module accelerate hooked itself (plain ``cpu_offload``, a
    ``device_map`` with "cpu" / "disk" entries) takes adapters."""
    for name in names:
        parent = parent_offloader(model, name)
        if parent is None:
            continue
        where = repr(parent) if parent else "the model itself"
        raise ValueError(
            f"module {name!r} lies inside {where}, whose accelerate hook offloads the weights "
            "of all its submodules at once (cpu_offload / dispatch_model with "
            "preload_module_classes, an AlignDevicesHook with place_submodules=True): it loads "
            "them by their names, which an adapter there would change, and it would put the "
            "adapter's tensors on the meta device after each call. Offload without "
            "preload_module_classes (cpu_offload(model, execution_device) hooks each module "
            "holding weights, and adapters work there), or load the base without offloading "
            "that module. Nothing was changed."
        )


def check_no_offloaded_bias(
    model: nn.Module,
    config,
    targets: Sequence[str],
    parameter_targets: Mapping[str, str] | None = None,
) -> None:
    """``ValueError`` naming the first module whose bias the new adapter's ``config.bias`` would
    train ("lora_only": of ``targets`` and the modules holding the ``parameter_targets``
    (``{layer path: parameter path}``: a module's second targeted parameter has a layer path
    ``<module>.base_layer`` that exists only once wrapped); "all": any module,
    ``modules_to_save`` aside) where accelerate offloaded it
    (``offloaded_tensors.offloaded_trained_biases``): each call loads the bias into a new
    tensor, so its training steps would be lost (silently, for a module no adapter wraps).
    Changes nothing; an adapter with ``inference_mode`` trains nothing and passes (a file's
    biases load into the offload maps: ``load_adapter``)."""
    from lorakit.offloaded_tensors import offloaded_trained_biases, trained_bias_refusal
    from lorakit.wrapped_modules import saved_module_names

    if config.bias == "none" or config.inference_mode:
        return
    saved = saved_module_names(model, config)
    owners = [path.rpartition(".")[0] for path in (parameter_targets or {}).values()]
    targets = [*targets, *dict.fromkeys(owner for owner in owners if owner not in targets)]
    found = offloaded_trained_biases(model, config.bias, targets, saved)
    if found:
        raise ValueError(f"{trained_bias_refusal(found[0][1], found[0][0])} Nothing was changed.")


def check_no_offloaded_bnb(model: nn.Module, names: Sequence[str]) -> None:
    """``ValueError`` naming the first of ``names`` (targets) whose base is a bitsandbytes layer
    accelerate offloaded (``cpu_offload``, a "cpu" / "disk" ``device_map`` entry): its
    ``quant_state`` is not in the offload map, so the base computes wrong values (a LoRA layer
    over it was 0.6 off the non-offloaded model, silently; the plain model raises). Changes
    nothing."""
    from lorakit import quantized
    from lorakit.layers.base import offload_hook
    from lorakit.quantized import bnb

    for name in names:
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        if quantized.backend_for(base) is bnb and offload_hook(base) is not None:
            raise ValueError(
                f"module {name!r} is a bitsandbytes layer ({type(base).__name__}) that "
                "accelerate offloaded: its quantization state is not kept in the offload map, "
                "so it cannot compute there. Load the quantized model without offloading it "
                "(no cpu_offload, no 'cpu' / 'disk' device_map entries), or offload an "
                "unquantized base. Nothing was changed."
            )


def map_holds(weights_map, key: str) -> bool:
    """Whether ``weights_map[key]`` (an accelerate offload map) gives a tensor with values (not
    on the meta device), decided without reading it where accelerate keeps it on disk: a
    ``PrefixedDataset`` is looked through (its ``prefix`` added to the key), an
    ``OffloadedWeightsLoader``'s in-memory ``state_dict`` is looked at and its disk ``index``
    holds a file entry for the key (read, it is a tensor with values); a plain dict is looked
    at. Any other mapping is read."""
    while hasattr(weights_map, "prefix") and hasattr(weights_map, "dataset"):
        key, weights_map = f"{weights_map.prefix}{key}", weights_map.dataset
    in_memory = getattr(weights_map, "state_dict", None)
    index = getattr(weights_map, "index", None)
    if isinstance(in_memory, dict) and isinstance(index, dict):
        if key in in_memory:
            return not getattr(in_memory[key], "is_meta", True)
        return key in index
    try:
        value = weights_map[key]
    except KeyError:
        return False
    return not getattr(value, "is_meta", True)


def offloaded_output(
    layer: nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor,
    adapters: Sequence[str],
    *args,
    **kwargs,
) -> torch.Tensor:
    """``layer.plain_output(x, weight, adapters, ...)`` of a LoRA layer whose base accelerate
    offloaded (``LoraLayer.forward``; the base is called through its hook). Where an adapter's
    own tensors are on the meta device too (``adapter_parameters``: the model was offloaded
    after its adapters were added), the layer's adapter modules are loaded for good first
    (``onload_for_good``): the output, and the gradients of a training step, are the
    non-offloaded model's. ``weight`` (None: a quantized base, called through its hook as it
    is) must be the live one, which the hook loads: a layer offloaded after a merge cannot
    compute without its merged adapters (``ValueError``: unmerge first), and a DoRA adapter
    cannot compute on an offloaded weight (``ValueError``: ``inject`` refuses DoRA there; this
    refuses one added before offloading, instead of torch's meta-device error). A base bias
    that an adapter of the call trains is refused before, at the model's forward
    (``offloaded_tensors.guard_trained_biases``)."""
    if layer.merged_adapters and weight is not None and weight is not layer.live_weight():
        raise ValueError(
            f"this LoRA layer on a {type(layer.base_layer).__name__} holds merged adapters "
            f"{list(layer.merged_adapters)} and accelerate offloaded it after the merge: its hook "
            "loads the merged weight for each call, so it cannot compute without them "
            "(lorakit.disabled, use_adapters or other active adapters). Unmerge first "
            "(lorakit.unmerge writes the original weight back into the offload map)."
        )
    dora = [name for name in adapters if layer.is_dora(name)]
    if dora and weight is not None:
        raise ValueError(
            f"adapter {dora[0]!r} uses DoRA (use_dora=True), which reads the base weight's "
            f"values at each forward, but accelerate offloaded this {type(layer.base_layer).__name__}"
            " (the model was offloaded after the adapter was added: its weight is on the meta "
            "device outside its forward). Load the base without offloading the targeted modules "
            "(more GPU / CPU memory, or a quantized base), or merge the adapter before offloading "
            "(lorakit.merge_and_unload). lorakit.save_adapter saves it as it is."
        )
    if any(p.is_meta for name in adapters for p in layer.adapter_parameters(name)):
        onload_for_good(layer)
    return layer.plain_output(x, weight, adapters, *args, **kwargs)


def hooked_modules(module: nn.Module, skip: str = ""):
    """``(submodule, its offload hook)`` of each module in ``module`` (itself included) whose
    own tensors accelerate offloads (``layers.base.offload_hook``), leaving out the subtree
    named ``skip`` (a LoRA layer's "base_layer")."""
    from lorakit.layers.base import offload_hook

    for path, sub in module.named_modules():
        if skip and path.partition(".")[0] == skip:
            continue
        if (hook := offload_hook(sub)) is not None:
            yield sub, hook


def onload_for_good(layer: nn.Module) -> None:
    """Load the offloaded adapter modules of the LoRA layer ``layer`` (``lora_A`` / ``lora_B``
    linears, embedding factor tables, DoRA magnitudes: its modules outside ``base_layer``) for
    good (``load_for_good``). The layer then is as an adapter added after offloading (on the
    execution device, ``inject``): trained in place, saved, merged and deleted like the
    non-offloaded model's. Its base stays offloaded."""
    load_for_good(list(hooked_modules(layer, skip="base_layer")))


def load_for_good(offloaded: Sequence[tuple[nn.Module, object]]) -> None:
    """Load each of the ``(module, hook)`` pairs of ``offloaded`` (``hooked_modules``) for
    good: each is loaded by its hook as for a call (``pre_forward``: the values of its offload
    map, on its execution device), each loaded tensor is swapped into the Parameter the module
    held (``torch.utils.swap_tensors``: the same object, now with values, so an optimizer or a
    parameter list made while it was on the meta device holds the trained tensor), and the
    hook stops offloading the module (``offload = False``; it still moves the inputs). Used
    for what an adapter owns that accelerate offloaded with the model: LoRA factors
    (``onload_for_good``), ``modules_to_save`` copies and token rows
    (``ModulesToSave.load_offloaded_copies``). (A Parameter that cannot be swapped, one with
    weak references, is replaced by the loaded one.)"""
    for module, hook in offloaded:
        held = dict(module._parameters)
        hook.pre_forward(module)
        for name, old in held.items():
            loaded = module._parameters[name]
            if old is None or loaded is old:
                continue
            try:
                torch.utils.swap_tensors(old, loaded)
            except RuntimeError:
                continue  # (the loaded Parameter stays in the module)
            module._parameters[name] = old
        hook.offload = False


def offloaded_holders(
    model: nn.Module, tensors: Iterable[torch.Tensor]
) -> list[tuple[nn.Module, object]]:
    """``(module, its accelerate offload hook)`` of each module of ``model`` that holds one of
    ``tensors`` (the very tensor objects, parameters or buffers) where accelerate offloads
    that module's tensors (``offload_hook``); a tensor no such module holds (on the meta device
    with no offload map: a model built there) gives none."""
    from lorakit.layers.base import offload_hook

    wanted = {id(tensor) for tensor in tensors}
    found = []
    for module in model.modules():
        held = [*module._parameters.values(), *module._buffers.values()]
        if any(id(tensor) in wanted for tensor in held if tensor is not None):
            hook = offload_hook(module)
            if hook is not None:
                found.append((module, hook))
    return found


@contextlib.contextmanager
def loaded_for_reading(offloaded: Sequence[tuple[nn.Module, object]]):
    """Within: each of the ``(module, hook)`` pairs of ``offloaded`` (``offloaded_holders``)
    loaded by its hook (``offloaded_merge.onloaded``: ``pre_forward``, the values of its
    offload map on its execution device, as for a call); after the block, raising or not,
    each offloaded again (``post_forward``), as after a call: the model is as it was. The
    modules' tensors are new objects within: look them up after entering."""
    from lorakit.offloaded_merge import onloaded  # (offloaded again if the block raises)

    with onloaded(offloaded):
        yield
    for module, hook in offloaded:
        hook.post_forward(module, None)
