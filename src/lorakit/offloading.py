"""Accelerate offloading beyond one layer's own base weight (``layers.base.offload_hook``).

- A hook on a PARENT module that offloads the weights of all its submodules at once
  (``cpu_offload`` / ``dispatch_model`` with ``preload_module_classes``: an ``AlignDevicesHook``
  with ``offload=True`` and ``place_submodules=True``): no adapter can sit under it, and
  ``inject`` / ``load_adapter`` refuse it before any change (``check_no_parent_offload``).
- Adapter tensors offloaded too (a model offloaded AFTER its adapters were added: accelerate
  hooks ``lora_A`` / ``lora_B`` like any module holding weights): read on the meta device,
  torch computes with uninitialised memory, silently; the forward loads them through their
  hooks for the call (``offloaded_output``).
- Whether an offload map holds a readable value for a key, without reading it (``map_holds``:
  a "disk" entry is read whole from its file; ``io.base_verdicts``).
- A bitsandbytes layer accelerate offloaded: its quantization state does not survive the
  offload map (the plain model itself fails there), so ``inject`` / ``load_adapter`` refuse it
  (``check_no_offloaded_bnb``; lorakit's own int8-rows / int4-groups layers and torchao's
  int8 weight-only ones work offloaded: ``quantized.torchao.base_forward`` loads its weight
  through the hook for the call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "check_no_offloaded_bnb",
    "check_no_parent_offload",
    "map_holds",
    "offloaded_output",
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
    own tensors are on the meta device too (``adapter_parameters``), each module of the layer
    outside ``base_layer`` that accelerate offloads is loaded by its hook for the call
    (``pre_forward``) and offloaded again after it (``post_forward``), as accelerate does
    around a module's call: the output is the non-offloaded model's. (Their gradients go to
    the tensors loaded for the call, as for any weight accelerate offloads: such a model is
    for inference.) ``weight`` (None: a quantized base, called through its hook as it is) must be
    the live one, which the hook loads: a layer offloaded after a merge cannot compute without
    its merged adapters (``ValueError``: unmerge first)."""
    from lorakit.layers.base import offload_hook

    if layer.merged_adapters and weight is not None and weight is not layer.live_weight():
        raise ValueError(
            f"this LoRA layer on a {type(layer.base_layer).__name__} holds merged adapters "
            f"{list(layer.merged_adapters)} and accelerate offloaded it after the merge: its hook "
            "loads the merged weight for each call, so it cannot compute without them "
            "(lorakit.disabled, use_adapters or other active adapters). Unmerge first "
            "(lorakit.unmerge writes the original weight back into the offload map)."
        )
    hooked = []
    if any(p.is_meta for name in adapters for p in layer.adapter_parameters(name)):
        modules = layer.named_modules()
        hooked = [
            (module, hook)
            for path, module in modules
            if path.partition(".")[0] != "base_layer" and (hook := offload_hook(module)) is not None
        ]
    from lorakit.offloaded_merge import onloaded  # (offloaded again if the call raises)

    with onloaded(hooked):
        out = layer.plain_output(x, weight, adapters, *args, **kwargs)
    for module, hook in hooked:
        hook.post_forward(module, None)
    return out
