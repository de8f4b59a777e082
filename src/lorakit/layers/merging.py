"""Merging a LoRA layer's adapters into its base weight, and undoing it exactly.

Merge and unmerge replace the layer's ``MergeState`` whole and a forward reads it once
(``read_merge_state``), so a forward running in another thread during a merge sees each layer
before or after it, never half-way. Merging installs a NEW weight Parameter
``W0 + sum_a s_a B_a A_a`` (a DoRA adapter adds ``f (W0 + s B A) - W0``; summed in float32, in
float64 on a float64 base, ``functional.merge_dtype``) and keeps the original one aside:
unmerging puts that very Parameter back, bit-identical, and a weight tied to another module (an
output embedding) is never changed behind that module's back.

The tensors kept aside are no parameters of the layer, so ``Merging._apply`` (behind
``.to()``, ``.half()``, ``.cuda()``) converts them with the model: after a cast or a move while
merged, unmerging puts back the original as the conversion converted it (what unmerging first,
then converting gives), and a forward with adapters disabled, a further merge and
``merge_and_unload`` read it in the model's new dtype, on its new device.

A layer merged and THEN offloaded by accelerate (``cpu_offload`` of the merged model: the
merged weight in the hook's offload map, a meta placeholder in the module) unmerges by writing
the original weight into that map (``_unmerge_offloaded``, as ``merge_and_unload`` writes
merged ones: ``lorakit.offloaded_merge``); a delete that would merge other adapters back into
it is refused (``prepare_delete``).

``Merging`` is the merge half of ``lorakit.layers.base.LoraLayer``; it uses the layer's
``live_weight`` / ``set_live_weight``, ``base_offload_hook``, ``innermost_base`` and
``merge_delta``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lorakit import functional

__all__ = ["MergeState", "Merging", "unmerged"]


class MergeState(NamedTuple):
    """Which adapters a layer's weight holds (immutable: merge and unmerge install a new one):
    ``adapters`` merged into ``weight`` (the merged Parameter), ``original`` the original one
    kept aside (not registered as a parameter of the layer). ((), None, None) when unmerged."""

    adapters: tuple[str, ...]
    weight: nn.Parameter | None
    original: nn.Parameter | None


def unmerged() -> MergeState:
    return MergeState((), None, None)  # a new object each time: a reader compares by identity


def _converted(tensor: torch.Tensor, fn) -> torch.Tensor:
    """``tensor`` converted by a ``Module._apply`` function ``fn`` as a module converts its
    own: a Parameter stays the same object where torch keeps it (``.data`` replaced, or the
    tensors swapped under ``torch.__future__``'s swap flag: a weight tied to another module
    stays tied), else a new Parameter of the same ``requires_grad``; its ``.grad`` too. Done
    by ``nn.Module._apply`` itself, on a holder module, so every torch rule applies."""
    if not isinstance(tensor, nn.Parameter):
        with torch.no_grad():
            return fn(tensor)
    holder = nn.Module()
    holder._parameters["tensor"] = tensor
    nn.Module._apply(holder, fn, recurse=False)
    return holder._parameters["tensor"]


def _moved(tensor: torch.Tensor, fn) -> torch.Tensor:
    """A new frozen Parameter: ``fn(tensor)`` where ``fn`` keeps the dtype, else ``tensor``
    only moved to the device ``fn`` chose (a quantized base's float32 merged weight keeps its
    dtype, as the quantized storage does, ``quantized.weight_only``). ``tensor`` itself is
    not changed (it is the layer's own, tied to nothing)."""
    with torch.no_grad():
        applied = fn(tensor.detach())
        if applied.dtype != tensor.dtype:
            applied = tensor.detach().to(applied.device)
    return nn.Parameter(applied, requires_grad=False)


class Merging:
    """Merge, unmerge and the merge state of a LoRA layer (see the module docstring)."""

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to()``, ``.half()``, ``.float()``, ``.cuda()``), then
        the same conversion for what merging keeps aside, which is no registered parameter:
        the original weight, and the original base bias of a merged bias on B
        (``LoraBiasMixin._kept_bias``). The merged weight installed in the base was converted
        with the base layer (re-read here, the very Parameter the base now holds); one kept
        beside a quantized base moves but stays float32 (``_moved``). Unmerging after
        ``model.to(torch.bfloat16)`` thus gives ``bf16(W0)``, as unmerging first would.
        ``recurse=False`` (the layer's own tensors only) leaves them, as it leaves the base's.
        Cooperative: ``LoraLinear._apply`` runs around this one."""
        state = self._merge_state
        installed = (
            bool(state.adapters)
            and state.original is not None
            and state.weight is self.live_weight()
        )
        result = super()._apply(fn, recurse)
        if not recurse:
            return result
        if state.adapters:
            if installed:
                weight = self.live_weight()
            elif state.original is None:
                weight = _moved(state.weight, fn)
            else:
                weight = _converted(state.weight, fn)
            original = None if state.original is None else _converted(state.original, fn)
            self._merge_state = MergeState(state.adapters, weight, original)
        kept_bias = getattr(self, "_kept_bias", ())
        if kept_bias:
            self._kept_bias = tuple(None if b is None else _converted(b, fn) for b in kept_bias)
        return result

    def read_merge_state(self) -> tuple[MergeState, torch.Tensor]:
        """``(state, W0)``: the merge state and the original base weight, read consistently with
        a merge or unmerge running in another thread (merge installs the state before the
        weight, unmerge the weight before the state; a state that changed while the live weight
        was read is read again)."""
        while True:
            state = self._merge_state
            if state.adapters:
                return state, state.original
            weight = self.live_weight()
            if self._merge_state is state:
                return state, weight

    def merge(self, adapter_names: Sequence[str]) -> None:
        """Fold ``s B A`` of each named adapter into the base weight (idempotent, exact undo).

        Raises ValueError (and leaves the weight untouched) if a delta is not finite.
        """
        prepared = self.prepare_merge(adapter_names)
        if prepared is not None:
            self.install_merge(prepared)

    def prepare_merge(
        self, adapter_names: Sequence[str], dtype: torch.dtype | None = None
    ) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """``(names, W)``: the weight with the named adapters merged, ``W0 + sum_a s_a B_a A_a``
        (a DoRA adapter adds ``f (W0 + s B A) - W0`` instead, ``merge_delta``), for the
        adapters not merged yet; None if there are none. The sum is computed in
        ``functional.merge_dtype(W0.dtype)`` (float32, float64 on a float64 base: no float32
        round trip there) and rounded once to ``dtype``, default W0's. Changes nothing; raises
        ValueError if W would hold inf/NaN.

        Computed without autograd: with grad enabled, torch (2.13) takes a parameter's autograd
        lock and then waits for the GIL, while a thread running the model holds the GIL and
        waits for that lock, so a merge beside a running forward could deadlock."""
        to_merge = tuple(dict.fromkeys(n for n in adapter_names if n not in self.merged_adapters))
        if not to_merge:
            return None
        original = self.original_weight
        with torch.no_grad():  # a weight edit: no graph, and no autograd locks (see below)
            delta = self._merged_delta((*self.merged_adapters, *to_merge))
            wide = original.detach().to(functional.merge_dtype(original.dtype))
            merged = (wide + delta).to(dtype or original.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging adapter(s) {list(to_merge)} would put non-finite values into the base "
                "weight (the adapter holds inf/NaN or overflows the weight dtype); nothing was "
                "changed."
            )
        return to_merge, merged

    def prepare_delete(self, adapter_name: str) -> tuple | None:
        """The re-merge that deleting ``adapter_name`` installs when it is merged: what
        ``prepare_merge`` gives for the other merged adapters on the unmerged layer,
        ``W0 + sum_{a merged, a != name} s_a B_a A_a`` (the base's own rounding, a merged
        ``lora_bias`` bias, a quantized base's float weight). None when there is nothing to
        re-merge (``adapter_name`` not merged, or merged alone: unmerging is all).

        Changes nothing (computed on an unmerged view of the layer), so a caller can prepare
        every layer before deleting from any; raises ValueError (``prepare_merge``'s) where a
        remaining adapter would put inf/NaN into the weight."""
        merged = self.merged_adapters
        still_merged = [name for name in merged if name != adapter_name]
        if adapter_name not in merged or not still_merged:
            return None
        if self._offloaded_holder():
            raise ValueError(
                "accelerate offloaded this layer after the merge (its merged weight is in the "
                "hook's offload map), and merging adapters back into it cannot be installed "
                f"there; unmerge first (then delete {adapter_name!r} and merge_and_unload the "
                "others), or delete it on the model before offloading. Nothing was changed."
            )
        return self._unmerged_view().prepare_merge(still_merged)

    def _unmerged_view(self) -> Merging:
        """A shallow copy of this layer that reads as unmerged: no merged adapters, and its
        live weight the original one kept aside. It shares every tensor and submodule (nothing
        is copied) and is for reading only (``prepare_delete``); the layer is not touched."""
        _, original = self.read_merge_state()
        view = copy.copy(self)
        view.__dict__["_merge_state"] = unmerged()
        if original is not None:  # (a quantized base keeps no float original: nothing to read)
            view.__dict__["live_weight"] = lambda: original
        return view

    def install_merge(self, prepared: tuple[tuple[str, ...], torch.Tensor]) -> None:
        """Install a weight from ``prepare_merge``, keeping the original Parameter for unmerge.
        The new state goes in before the weight (see ``read_merge_state``)."""
        to_merge, merged = prepared
        state = self._merge_state
        weight = nn.Parameter(merged, requires_grad=False)
        original = self.original_weight
        self._merge_state = MergeState((*state.adapters, *to_merge), weight, original)
        self.set_live_weight(weight)

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """The adapters folded into the base weight (() when unmerged)."""
        return self._merge_state.adapters

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter (the very tensor the model was built with)."""
        state = self._merge_state
        return state.original if state.adapters else self.live_weight()

    def unmerge(self) -> None:
        """Put the original weight Parameter back: bit-identical, and ties to it restored.
        The weight goes back before the state (see ``read_merge_state``). Where accelerate
        offloaded the base after the merge, into its offload map (``_unmerge_offloaded``)."""
        state = self._merge_state
        if not state.adapters:
            return
        offloaded = self._offloaded_holder()
        if offloaded:
            self._unmerge_offloaded(state.original, offloaded)
        else:
            self.set_live_weight(state.original)
        self._merge_state = unmerged()

    def _offloaded_holder(self) -> list[tuple[nn.Module, object]]:
        """``[(module holding the live weight, its accelerate offload hook)]`` where that
        weight is offloaded now (``base_offload_hook``: on the meta device, its value in the
        hook's map), else []. The holder is the base under any nested LoRA layers."""
        hook = self.base_offload_hook()
        if hook is None:
            return []
        return [(self.innermost_base(), hook)]

    def _unmerge_offloaded(self, original: torch.Tensor, offloaded: list) -> None:
        """``unmerge`` of a layer accelerate offloaded after the merge: the hook's offload map
        holds the merged weight (and a merged bias on B, ``lora_bias``), which it loads at each
        call, so putting ``original`` into the module alone would change nothing. The module
        is loaded (``offloaded_merge.onloaded``), ``W0`` (and the original bias kept aside,
        ``_kept_bias``) put back into it, and the hook given a new map of its tensors
        (``offload_merged``, as ``merge_and_unload`` does): each later call loads ``W0``, the
        very values kept aside; the module is offloaded again."""
        from lorakit.offloaded_merge import offload_merged, onloaded

        ((holder, _),) = offloaded
        with onloaded(offloaded):
            self.set_live_weight(original)
            kept_bias = getattr(self, "_kept_bias", ())
            if kept_bias and kept_bias[0] is not None:
                holder.bias = kept_bias[0]
                self._kept_bias = ()  # (put back here: ``LoraBiasMixin.unmerge`` has none left)
        offload_merged(offloaded)

    def forget_original(self) -> None:
        """Keep the merged weight for good (used by ``merge_and_unload``)."""
        self._merge_state = unmerged()

    def unloaded_module(self, float_dtype: torch.dtype | None = None) -> nn.Module:
        """What replaces this layer in ``merge_and_unload``: the base layer, holding the merged
        weight for good (``float_dtype`` concerns quantized bases only)."""
        self.forget_original()
        return self.base_layer

    def _merged_delta(self, adapter_names: Sequence[str]) -> torch.Tensor:
        total = None
        for name in adapter_names:
            delta = self.merge_delta(name)
            if not torch.isfinite(delta).all():
                raise ValueError(
                    f"adapter {name!r} holds non-finite values (inf/NaN); refusing to merge it "
                    "into the base weight. Nothing was changed."
                )
            total = delta if total is None else total + delta
        return total
