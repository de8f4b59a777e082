"""``ModulesToSave``: a module trained in full beside LoRA (e.g. a new classification head).

Like PEFT: the original module is kept frozen as ``original_module`` and each adapter owns a
trainable copy in ``modules_to_save[adapter]``. The active adapter's copy runs the forward.
A quantized layer (``lorakit.quantized``), or a module holding one, cannot be saved this way:
its weight is quantized storage, which no optimizer step can train (``check_saveable``).

A module accelerate offloaded (``cpu_offload``, a ``device_map`` with "cpu" / "disk" entries:
its weights on the meta device, their values in its hook's ``weights_map``) gets a copy holding
the real weights, read from that map onto the hook's execution device, without the hook
(``trainable_copy``): it trains, loads and saves as on the plain model, and the original stays
offloaded. A copy made BEFORE the model was offloaded is offloaded with it (accelerate hooks it
like any module holding weights): the first forward loads the copies for good
(``load_offloaded_copies``), into the Parameters the model holds, so they train as on the plain
model (each call's copy of the hook took the gradients before, and token rows failed).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from lorakit import offloading, quantized
from lorakit.layers.base import offload_hook
from lorakit.layers.per_call import current_override

__all__ = ["ModulesToSave", "check_saveable", "trainable_copy"]

_HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "forward")
"""What accelerate's ``add_hook_to_module`` puts on a module (the hook, the module's own
forward, and the wrapper that runs the hook around it)."""


def check_saveable(module: nn.Module, name: str) -> None:
    """``ValueError`` if ``module`` (a ``modules_to_save`` entry of the model, at ``name``) is or
    holds a quantized layer: a full trainable copy of quantized storage trains nothing (its
    codes are integers, or a tensor subclass no optimizer steps), or bitsandbytes refuses to
    give it gradients. Changes nothing."""
    original = module.original_module if isinstance(module, ModulesToSave) else module
    for inner_name, inner in original.named_modules():
        if quantized.is_quantized(inner):
            try:
                kind = f"quantized as {quantized.describe(inner)}"
            except quantized.UnsupportedQuantizedLayerError:  # e.g. a bnb layer repacked
                kind = f"a quantized {type(inner).__name__}"
        else:
            reason = quantized.looks_quantized(inner)
            if reason is None:
                continue
            kind = f"which looks quantized: {reason}"
        where = (
            f"{name!r} is a layer {kind}"
            if not inner_name
            else f"{name!r} holds {inner_name!r}, a layer {kind}"
        )
        raise ValueError(
            f"modules_to_save: {where}. A full trainable copy of quantized storage cannot "
            "train (nothing would change, or bitsandbytes refuses gradients). Adapt it with "
            "LoRA instead (put it in target_modules, and take it out of modules_to_save), or "
            "load the base unquantized to train it in full. Nothing was changed."
        )


def trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` to train in full. Where accelerate offloaded ``module`` or a
    submodule (``offload_hook``), the copy has no such hook (nor the hook's offload map, which for
    ``cpu_offload`` holds the whole model's weights: never copied): each tensor the hook
    offloaded (on the meta device) is read from its ``weights_map`` onto its execution device,
    in the tensor's dtype (as the hook loads it), into a tensor of the copy's own (training it
    leaves the map as it was), and the copied module gets an ``AlignDevicesHook`` that only
    moves its inputs to that device (and its output back where the hook did so), as accelerate
    hooks a module it does not offload. A hook that offloads nothing is copied with the module,
    as before."""
    offloaded = [
        (path, sub, hook)
        for path, sub in module.named_modules()
        if (hook := offload_hook(sub)) is not None
    ]
    memo = {  # (deepcopy takes these as copied already: to None)
        id(sub.__dict__[a]): None
        for _, sub, _ in offloaded
        for a in _HOOK_ATTRIBUTES
        if a in sub.__dict__
    }
    trainable = copy.deepcopy(module, memo)
    for path, _, hook in offloaded:
        target = trainable.get_submodule(path)
        for attribute in _HOOK_ATTRIBUTES:
            target.__dict__.pop(attribute, None)
        _read_offloaded(target, hook)
        if hook.execution_device is not None:
            _align_devices(target, hook)
    return trainable


def _read_offloaded(target: nn.Module, hook) -> None:
    """Give each meta tensor of ``target`` that ``hook`` offloads (its own, or all under it
    for a hook with ``place_submodules``) its value from ``hook.weights_map``: a copy on the
    execution device in the tensor's dtype (a Parameter keeps its ``requires_grad``). A key
    the map lacks stays on the meta device, as it is in the original."""
    recurse = bool(getattr(hook, "place_submodules", False))
    device = hook.execution_device
    tensors = itertools.chain(
        target.named_parameters(recurse=recurse), target.named_buffers(recurse=recurse)
    )
    for name, tensor in list(tensors):
        if not tensor.is_meta:
            continue
        try:
            value = hook.weights_map[name]  # (read once: a "disk" entry is read from its file)
        except KeyError:
            continue
        dtype = tensor.dtype if value.is_floating_point() else value.dtype
        value = value.to(device=device or value.device, dtype=dtype, copy=True)
        owner_path, _, leaf = name.rpartition(".")
        owner = target.get_submodule(owner_path)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=tensor.requires_grad)
        else:
            owner._buffers[leaf] = value


def _align_devices(target: nn.Module, hook) -> None:
    """Hook ``target`` (a copy's module) with accelerate's ``AlignDevicesHook`` without
    offloading: its inputs go to ``hook``'s execution device, its output back to the input's
    device where ``hook`` did that (``io_same_device``)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    aligning = AlignDevicesHook(
        execution_device=hook.execution_device,
        io_same_device=hook.io_same_device,
        skip_keys=hook.skip_keys,
    )
    add_hook_to_module(target, aligning)


class ModulesToSave(nn.Module):
    """Per-adapter full copies of one module; the first active adapter that has a copy wins."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save)

    def add_adapter(self, adapter_name: str) -> None:
        """A trainable copy of ``original_module`` for ``adapter_name`` (``trainable_copy``:
        an offloaded module's holds its real weights, on the hook's execution device)."""
        trainable = trainable_copy(self.original_module)
        for parameter in trainable.parameters():
            parameter.requires_grad_(True)
        self.modules_to_save[adapter_name] = trainable

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter_name)

    def chosen_module(self) -> nn.Module:
        override = current_override(self)
        active = self.active_adapters if override is None else override
        for name in active:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def load_offloaded_copies(self) -> None:
        """Load the copies (every adapter's) that accelerate offloaded with the model (added
        before it was offloaded: on the meta device, their values in their hooks' maps) for
        good onto their hooks' execution device (``offloading.load_for_good``: into the
        Parameters they hold, so an optimizer made before trains them), as a copy made
        after offloading lives there. Nothing to do (a look at the copies' parameters) once
        loaded, or where nothing was offloaded."""
        if any(parameter.is_meta for parameter in self.modules_to_save.parameters()):
            offloading.load_for_good(list(offloading.hooked_modules(self.modules_to_save)))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.load_offloaded_copies()
        return self.chosen_module()(*args, **kwargs)
