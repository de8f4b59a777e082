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
  ``offloaded_trained_biases``); ``refuse_trained_bias`` refuses a forward that records
  gradients for it (the LoRA layer's forward over an offloaded base,
  ``offloading.offloaded_output``; any module whose bias a loaded file wrote into its map,
  ``write_offloaded``); under ``torch.no_grad`` the outputs are exact.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lorakit.offloading import offloaded_holders

__all__ = [
    "offloaded_trained_biases",
    "refuse_trained_bias",
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
    written there is guarded: a forward of its module that would train it is refused
    (``refuse_trained_bias``), whether or not an adapter wraps the module."""
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
        if name == "bias":
            _guard_bias(holder)
        return hook, old_map
    return None


def restore_maps(written: Sequence[tuple[object, object]]) -> None:
    """Give each hook of ``written`` (``write_offloaded``'s pairs, in the order written) its
    old map back, last written first: the model's offloaded values are as before."""
    for hook, old_map in reversed(written):
        hook.weights_map = old_map


def refuse_trained_bias(base: nn.Module) -> None:
    """``ValueError`` where the offloaded ``base`` (a LoRA layer's base module, or a module whose
    bias a loaded file wrote into its map: its tensors in its hook's map) has a bias that trains
    (``requires_grad``: an active adapter with ``bias="all"`` / ``"lora_only"``) and the call
    records gradients: the hook loads the bias into a new tensor for the call, so its gradient
    would be dropped with it. Changes nothing."""
    bias = getattr(base, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(trained_bias_refusal(base))


def trained_bias_refusal(module: nn.Module, name: str | None = None) -> str:
    """Why the bias of ``module`` cannot train where accelerate offloaded the module, and the
    ways out: at a forward, or at ``inject`` (``name``: the module's path; nothing changed)."""
    where = f"module {name!r}: " if name else ""
    inference = (
        "give the config inference_mode=True (nothing trains), or load the adapter's file with "
        "lorakit.load_adapter (its biases are written into the offload maps)"
        if name
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


_GUARDED: weakref.WeakSet = weakref.WeakSet()


def _guard_bias(module: nn.Module) -> None:
    """Refuse (``refuse_trained_bias``) each forward of ``module`` that would train its
    offloaded bias: a torch forward pre-hook, run before accelerate's hook loads the module;
    once per module."""
    if module not in _GUARDED:
        module.register_forward_pre_hook(_refuse_at_call)
        _GUARDED.add(module)


def _refuse_at_call(module: nn.Module, args) -> None:
    refuse_trained_bias(module)
