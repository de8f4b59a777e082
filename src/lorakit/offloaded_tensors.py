"""Base tensors of modules accelerate offloaded (``cpu_offload``, ``disk_offload``, a
``device_map`` with "cpu" / "disk" entries: the module's tensors on the meta device between
calls, their values in its hook's ``weights_map``) that an adapter writes or trains.

- An adapter file's base tensors (the biases a ``bias="all"`` / ``"lora_only"`` adapter trained,
  an embedding's base weight saved with a resized vocabulary): copied into the module's meta
  tensor they were lost (the hook loads its map's value at each call: GPT-2's logits were 0.3
  to 0.7 off, silently; ``set_peft_model_state_dict`` the same). ``write_offloaded`` writes
  the value into the hook's map instead, as merges of offloaded weights do
  (``offloaded_merge.offload_merged``), here as an overlay ``ChainMap({name: value}, old
  map)``: the old map, which ``cpu_offload`` shares with every module, and a "disk" module's
  files are left as they were; ``restore_maps`` puts the old maps back (``io.load``'s
  roll-back, where it restores the biases it wrote).
- Such a bias that a ``bias`` mode trains (``requires_grad``): each call loads it from the map
  into a new tensor, so a training step's gradient never reaches the model's bias.
  ``inject`` refuses such an adapter before any change (``offloading.check_no_offloaded_bias``:
  the LoRA bases of ``bias="lora_only"``, every module of ``bias="all"``, targeted or not;
  ``offloaded_trained_biases``). A model offloaded AFTER ``inject`` (``cpu_offload`` /
  ``dispatch_model`` of a LoRA layer's base, or of modules no adapter wraps, e.g. the MLPs,
  under ``bias="all"``), or a file's trained biases written into the maps: a forward that
  records gradients while an adapter it computes with trains such a bias is refused with
  ``inject``'s message (``guard_trained_biases``: ``state.set_active`` hands it the biases it
  makes trainable); under ``torch.no_grad`` the outputs are exact. A forward that computes
  with no bias-training adapter (after ``delete_adapter`` of that adapter, inside
  ``lorakit.disabled``, a ``bias="none"`` adapter chosen) runs, as PEFT's does: the biases'
  leftover ``requires_grad`` gets no gradient from it (``_call_trains_biases``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lorakit.offloading import offloaded_holders

__all__ = [
    "guard_trained_biases",
    "offloaded_trained_biases",
    "restore_maps",
    "trained_bias_refusal",
    "write_offloaded",
]


class _Overlay(collections.ChainMap):
    """``ChainMap(written values, the hook's map before)``, as ``write_offloaded`` makes it."""


def write_offloaded(
    module: nn.Module, tensor: torch.Tensor, value: torch.Tensor
) -> tuple[object, object] | None:
    """Write ``value`` as the value of ``tensor`` (a parameter or buffer of ``module`` or of a
    module under it) where accelerate offloaded the module holding it (``tensor`` on the meta
    device, its holder's hook found by ``offloading.offloaded_holders``): that hook's map
    becomes ``ChainMap({name: value}, old map)``, ``value`` a CPU copy in ``tensor``'s dtype
    (as ``tensor.copy_(value)`` casts it), so each later call loads it. Returns ``(hook, old
    map)`` for ``restore_maps``; None (nothing written) where ``tensor`` is not offloaded.
    A map that is such an overlay already is replaced by a new one holding its values and
    ``value`` (one level, however often tensors are written; the old one as it was). A bias
    written there that an active adapter trains is refused at a forward that records gradients
    by ``guard_trained_biases`` (set by ``state.set_active``; none once no adapter of the call
    trains biases)."""
    if not tensor.is_meta:
        return None
    for holder, hook in offloaded_holders(module, [tensor]):
        held = {**holder._parameters, **holder._buffers}
        name = next(key for key, each in held.items() if each is tensor)
        stored = value.detach().to(device="cpu", dtype=tensor.dtype, copy=True).contiguous()
        old_map = hook.weights_map
        if isinstance(old_map, _Overlay):
            hook.weights_map = _Overlay({**old_map.maps[0], name: stored}, old_map.maps[1])
        else:
            hook.weights_map = _Overlay({name: stored}, old_map)
        return hook, old_map
    return None


def restore_maps(written: Sequence[tuple[object, object]]) -> None:
    """Give each hook of ``written`` (``write_offloaded``'s pairs, in the order written) its
    old map back, last written first: the model's offloaded values are as before."""
    for hook, old_map in reversed(written):
        hook.weights_map = old_map


def trained_bias_refusal(
    module: nn.Module, name: str | None = None, at_inject: bool | None = None
) -> str:
    """Why the bias of ``module`` (at the path ``name``, if given) cannot train where accelerate
    offloaded the module, and the ways out: at ``inject`` (``at_inject``, by default where
    ``name`` is given: nothing changed), or at a forward."""
    where = f"module {name!r}: " if name else ""
    inference = (
        "give the config inference_mode=True (nothing trains), or load the adapter's file with "
        "lorakit.load_adapter (its biases are written into the offload maps)"
        if (bool(name) if at_inject is None else at_inject)
        else "run the model under torch.no_grad() (the outputs are exact) or freeze the biases "
        "(requires_grad_(False))"
    )
    return (
        f"{where}the bias of this {type(module).__name__} trains (an adapter with bias='all' or "
        "'lora_only'), but accelerate offloaded the module: each call loads the bias from its "
        "offload map into a new tensor, so a training step's gradient would never reach it. "
        "To train base biases, load the base without offloading these modules (or train with "
        "bias='none', or bias='lora_only' where only modules no adapter targets are "
        f"offloaded); for inference, {inference}."
    )


def offloaded_trained_biases(
    model: nn.Module, bias: str, targets: Iterable[str], saved: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of each module whose bias Parameter the ``bias`` mode of a new adapter
    trains and that accelerate offloads, in model order: ``"lora_only"`` the modules at
    ``targets`` (a LoRA layer's innermost base), ``"all"`` every module (as
    ``state.set_active`` picks them) but the ``modules_to_save`` ``saved`` and what they hold
    (their copies train whole); ``"none"`` none. Offloaded: by its own hook
    (``layers.base.offload_hook``), or, for a module that is no target, by a parent's
    (``offloading.parent_offloader``; a target there is ``check_no_parent_offload``'s)."""
    from lorakit.layers.base import LoraLayer, offload_hook
    from lorakit.layers.saved import ModulesToSave
    from lorakit.offloading import parent_offloader
    from lorakit.state import walk_modules

    targets = list(targets)
    if bias == "all":
        picked = [(p, m) for p, m in walk_modules(model) if not isinstance(m, ModulesToSave)]
        picked = [(p, m) for p, m in picked if not any(_within(p, s) for s in saved)]
    else:
        picked = [(p, model.get_submodule(p)) for p in targets] if bias == "lora_only" else []
    found = []
    for path, module in picked:
        base = module.innermost_base() if isinstance(module, LoraLayer) else module
        if not isinstance(getattr(base, "bias", None), nn.Parameter):
            continue
        under_parent = path not in targets and parent_offloader(model, path) is not None
        if offload_hook(base) is not None or under_parent:
            found.append((path, base))
    return found


def _within(path: str, saved: str) -> bool:
    return path == saved or path.startswith(f"{saved}.")


def guard_trained_biases(model: nn.Module, biases: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Refuse each forward of ``model`` (the module holding the adapters, ``state.adapter_model``)
    that records gradients while a module holding one of ``biases`` (the base biases the active
    adapters' ``bias`` mode trains: ``state.set_active``, which calls this each time) is
    offloaded by accelerate: offloaded AFTER ``inject`` (which refuses the modules offloaded
    before), each call would load its bias into a new tensor and the steps would be lost,
    silently for a module no adapter wraps. A forward pre-hook on ``model`` (run before any
    accelerate hook loads a module), added once, its holders replaced at each call; none is
    added while no bias trains. Cost per forward, where nothing is offloaded: one look at each
    holder's bias (``_TrainedBiasGuard``). A forward no adapter it computes with trains biases
    of passes (``_call_trains_biases``). Returns ``biases``."""
    from lorakit.layers.base import LoraLayer
    from lorakit.layers.saved import ModulesToSave
    from lorakit.state import adapter_model

    model = adapter_model(model)
    hooks = model._forward_pre_hooks.values()
    guard = next((hook for hook in hooks if isinstance(hook, _TrainedBiasGuard)), None)
    if guard is None and not biases:
        return list(biases)
    if guard is None:
        guard = _TrainedBiasGuard()
        model.register_forward_pre_hook(guard)
    guard.probe = next(
        (m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave))), None
    )
    wanted = {id(bias) for bias in biases}
    held = [(m, m._parameters.get("bias")) for m in model.modules()]
    guard.holders = [(m, None if b.is_meta else b) for m, b in held if id(b) in wanted]
    return list(biases)


class _TrainedBiasGuard:
    """``guard_trained_biases``' hook: ``holders``, ``(module, its bias)`` for each module whose
    bias trains (None for a bias on the meta device). Offloading replaces the module's bias by
    one on the meta device between calls (this runs before any is loaded): only a module that
    no longer holds the very bias it had is looked at (``_refuse_if_offloaded``). A model that
    ``unload`` left (no adapter state) passes, and so does a call whose adapters train no bias
    (``_call_trains_biases``; ``probe``: a LoRA layer or saved module of the model, whose
    per-call choice is the call's). (A plain object: ``copy.deepcopy`` of the model copies it
    with the copy's modules.)"""

    def __init__(self) -> None:
        self.holders: list[tuple[nn.Module, nn.Parameter | None]] = []
        self.probe: nn.Module | None = None

    def __call__(self, model: nn.Module, args) -> None:
        if not torch.is_grad_enabled() or not self.holders:
            return
        if not _call_trains_biases(model, self.probe):
            return
        for module, held in self.holders:
            bias = module._parameters.get("bias")
            if bias is not held and bias is not None and bias.is_meta and bias.requires_grad:
                _refuse_if_offloaded(model, module)


def _call_trains_biases(model: nn.Module, probe: nn.Module | None) -> bool:
    """Whether an adapter this call of ``model`` computes with (the per-call choice of
    ``use_adapters`` / ``disabled`` on ``probe``, else the model's active adapters) trains base
    biases (``bias`` "all" / "lora_only"). False without adapter state (``unload``), after
    ``delete_adapter`` of the adapter that made them trainable (its flags stay, as PEFT's), and
    inside ``lorakit.disabled``: PEFT runs such forwards on an offloaded model, and so does this
    guard (the offloaded biases get no gradient from them, as no adapter of the call trains)."""
    from lorakit.layers.per_call import current_override

    state = model.__dict__.get("lorakit_state")
    if state is None:
        return False
    chosen = None if probe is None else current_override(probe)
    names = state.active if chosen is None else chosen
    return any(state.configs[name].bias != "none" for name in names if name in state.configs)


def _refuse_if_offloaded(model: nn.Module, module: nn.Module) -> None:
    """``ValueError`` (``trained_bias_refusal`` naming ``module``'s path) where accelerate
    offloads ``module`` of ``model``: by its own hook, or by a parent's that offloads all its
    submodules (a module merely built on the meta device is torch's to refuse)."""
    from lorakit.layers.base import offload_hook
    from lorakit.offloading import parent_offloader

    path = next((path for path, sub in model.named_modules() if sub is module), None)
    if path is None:
        return  # (no longer in the model)
    if offload_hook(module) is not None or parent_offloader(model, path) is not None:
        named = path.replace(".base_layer", "")  # (a LoRA layer's base: the layer's path)
        raise ValueError(trained_bias_refusal(module, named, at_inject=False))
