"""``LoraLayer``: what every LoRA layer shares: named adapters, the forward, merge state.

A LoRA layer WRAPS the original module, kept as ``base_layer``; ``lorakit.unload`` puts that very
object back. Subclasses (``LoraLinear``, ``LoraEmbedding``) give the factors' shapes and init
rule and compute the base and the low-rank branch (``lorakit.functional``). ``forward`` is the
whole layer: ``h = base(x) + sum_a s_a B_a A_a dropout(x)`` by one of four named paths (a DoRA
adapter adds ``(f - 1) W0 x~ + f s B A x~`` instead: ``dora_branch``, ``layers/linear_dora.py``).

Adding and deleting adapters (their factors drawn as PEFT draws them) is the ``AdapterTables`` part
of the class (``lorakit.layers.adapter_tables``); the base weight and its accelerate offload hook
are the ``BaseWeight`` part (``lorakit.layers.base_weight``). Merging and unmerging
(``lorakit.layers.merging``, the ``Merging`` part) replace the layer's ``MergeState`` whole and a
forward reads it once, so a forward running in another thread during a merge sees each layer before
or after it, never half-way: every layer computes ``W0 x + s B A x``, merged or not (equal within
rounding); which layers of the model it sees merged is not defined. A base layer called as a module
(hooks, extra arguments, a subclass) reads its own weight when it runs and is not covered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.layers.adapter_tables import AdapterTables
from lorakit.layers.base_weight import BaseWeight, offload_hook
from lorakit.layers.merging import Merging, unmerged
from lorakit.layers.per_call import current_override, current_router
from lorakit.offloading import offloaded_output

__all__ = ["LoraLayer", "offload_hook"]


def _same_adapters(chosen: tuple[str, ...], merged: tuple[str, ...]) -> bool:
    return chosen == merged or (bool(merged) and set(chosen) == set(merged))


class LoraLayer(AdapterTables, Merging, BaseWeight, nn.Module):
    """Common state of a module with LoRA adapters beside a frozen ``base_layer``.

    Per adapter name: ``ranks[name]`` (r), ``alphas[name]``, ``scalings[name]`` (s) and
    ``dropouts[name]`` (p). ``active_adapters`` are added to the output; ``merged_adapters``
    are folded into the base weight. Merging installs a NEW weight Parameter and keeps the
    original one aside, so unmerging is exact and a weight tied to another module (an output
    embedding) is never changed behind that module's back.
    """

    supports_dora = False
    """Whether the layer takes DoRA adapters (``add_magnitude``; checked before a model is
    changed)."""

    supports_lora_bias = False
    """Whether the layer takes adapters with a bias on B (``add_lora_bias``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.scalings: dict[str, float] = {}
        self.dropouts: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self._merge_state = unmerged()
        self.base_fingerprints_before_init: dict[str, dict] = {}
        """Per adapter made by a base-changing init (``lorakit.init_methods``): the fingerprint
        of the base weight before it was overwritten (what a converted adapter fits)."""

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + sum_a s_a B_a A_a dropout(x)`` over the chosen, unmerged adapters.

        Shapes: those of the base layer (``LoraLinear``: x (..., k) -> (..., d)).
        """
        router = current_router()
        if router is not None:  # serving: each row adds its own adapter (lorakit.serve)
            return router(self, x, self.routed_base_output(x, *args, **kwargs))
        merge, original = self.read_merge_state()  # once: merge/unmerge replace it whole
        adapters = self.chosen_adapters()
        if _same_adapters(adapters, merge.adapters):  # nothing to add: none, or the merged ones
            weight = merge.weight if merge.adapters else original
            return self.base_output(weight, x, *args, **kwargs)
        if self.base_offload_hook() is not None:  # accelerate offloaded it (a meta weight)
            return offloaded_output(self, x, original, adapters, *args, **kwargs)
        fast_adapters = None
        if not (args or kwargs):
            fast_adapters = self.fast_adapters(x, original, adapters)
        if fast_adapters is not None:  # fused: base and adapters in one pass (lorakit.fast)
            return self.fast_output(x, original, fast_adapters)
        return self.plain_output(x, original, adapters, *args, **kwargs)

    def routed_base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base output a serving router adds each row's adapter to: the base layer's own
        (a quantized base overrides this with its backend's kernel, as its unmerged forward)."""
        return self.base_layer(x, *args, **kwargs)

    def chosen_adapters(self) -> tuple[str, ...]:
        """The adapters this call adds: the per-call choice (``use_adapters``, ``disabled``) or
        else ``active_adapters``, kept to those this layer has."""
        override = current_override(self)
        chosen = self.active_adapters if override is None else override
        return tuple(name for name in chosen if name in self.ranks)

    def base_output(self, weight: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x)`` computed with ``weight`` (the merged or the original one). A base layer
        with hooks, extra arguments or of a subclass is called itself: as it is when ``weight``
        is its own (it then reads its weight when it runs), else with ``weight`` swapped in for
        the call (``torch.func.functional_call``: its forward, e.g. a scaled embedding's
        ``embed_scale``, and its hooks run on the original weight while merged). A plain base
        is computed directly."""
        if not self.calls_base_module(weight, *args, **kwargs):
            return self.base_forward_with_weight(weight, x)
        if weight is self.base_layer.weight:
            return self.base_layer(x, *args, **kwargs)
        swapped = {"weight": weight}
        bias_for = getattr(self, "_bias_for", None)  # a merged bias on B goes with its weight
        bias = None if bias_for is None else bias_for(weight)
        if bias is not None and bias is not self.base_layer.bias:
            swapped["bias"] = bias
        return torch.func.functional_call(self.base_layer, swapped, (x, *args), kwargs)

    def calls_base_module(self, weight: torch.Tensor, *args, **kwargs) -> bool:
        """True when ``base_output`` runs the base layer itself (hooks, extra arguments, a
        subclass), with whichever weight: its output is then not ours to change in place (a
        forward hook may hold it)."""
        return bool(args or kwargs) or not self.base_is_plain() or self.base_is_hooked()

    def base_is_hooked(self) -> bool:
        """True when accelerate hooked the base layer (``_hf_hook``: ``cpu_offload``,
        ``dispatch_model``, a ``device_map``): its call runs the hook, which may load an
        offloaded weight from the offload map and moves the input to the hook's device, so the
        base is called, never computed from its weight (``base_output``). The fused path, which
        reads the weight, is left only where it is offloaded (``base_offload_hook``): a hooked
        base with real weights (a multi-device ``device_map``) keeps it, ``fast.applies``
        refusing an input on another device."""
        return hasattr(self.base_layer, "_hf_hook")

    def plain_output(
        self, x: torch.Tensor, weight: torch.Tensor, adapters: Sequence[str], *args, **kwargs
    ) -> torch.Tensor:
        """The plain formula: ``base(x)`` with ``weight``, plus each adapter's branch
        ``s B A dropout(x)`` (added in place when no gradient is recorded and the base output
        is a fresh tensor of ours, not the base module's, which its hooks may hold)."""
        out = self.base_output(weight, x, *args, **kwargs)
        in_place = not torch.is_grad_enabled() and not self.calls_base_module(
            weight, *args, **kwargs
        )
        base_out = out  # DoRA scales the base output: keep it apart from the sum
        if in_place and len(adapters) > 1 and any(map(self.is_dora, adapters)):
            base_out = out.clone()
        for name in adapters:
            if in_place:
                out = self.add_adapter_(out, name, x, weight, base_out)
            else:
                out = out + self.adapter_branch(name, x, weight, base_out).to(out.dtype)
        return out

    def add_adapter_(
        self,
        out: torch.Tensor,
        adapter_name: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        base_out: torch.Tensor,
    ) -> torch.Tensor:
        """``out += adapter_branch(...)`` in place (no gradient is recorded; ``out`` is a fresh
        tensor of ours); returns ``out``. ``LoraLinear`` does it in fewer ops for plain LoRA."""
        return out.add_(self.adapter_branch(adapter_name, x, weight, base_out))

    # ----------------------------------------------------------------- subclass interface
    def init_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor, init: bool | str) -> None:
        """Initialise new factors in place by ``LoraConfig.init_lora_weights`` (``init``)."""
        raise NotImplementedError

    def store_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Register the factors as the adapter's Parameters (taken over, no copy)."""
        raise NotImplementedError

    def _delete_adapter_tensors(self, adapter_name: str) -> None:
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable tensors of one adapter (A first, then B)."""
        raise NotImplementedError

    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of A and B for an adapter of rank ``rank``."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B A`` in ``functional.merge_dtype`` of the base (float32; float64 on a float64
        base), laid out like ``base_layer.weight``."""
        raise NotImplementedError

    def merge_delta(self, adapter_name: str) -> torch.Tensor:
        """What merging the adapter adds to the original weight (in ``delta_weight``'s dtype,
        laid out like it):
        ``delta_weight`` for LoRA."""
        return self.delta_weight(adapter_name)

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The low-rank output of one adapter for input ``x``."""
        raise NotImplementedError

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output computed with ``weight`` in place of its own."""
        raise NotImplementedError

    def is_dora(self, adapter_name: str) -> bool:
        """True when ``adapter_name`` is a DoRA adapter (``supports_dora`` layers only)."""
        return False

    def adapter_branch(
        self, adapter_name: str, x: torch.Tensor, weight: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        """What the adapter adds to ``base_out`` (the base output computed with ``weight``):
        ``lora_branch`` (a DoRA layer also scales the base output, ``layers/dora.py``)."""
        return self.lora_branch(adapter_name, x)

    def base_is_plain(self) -> bool:
        """True when ``base_forward_with_weight`` computes exactly what calling the base layer
        does (its exact type, no hooks)."""
        return False

    def fast_adapters(
        self, x: torch.Tensor, weight: torch.Tensor, adapters: Sequence[str]
    ) -> list | None:
        """The adapters as the fast path takes them, or None where it does not apply to this
        call (the layer has none, or see ``lorakit.fast``): the plain formula is then used."""
        return None

    def fast_output(
        self, x: torch.Tensor, weight: torch.Tensor, fast_adapters: list
    ) -> torch.Tensor:
        """``base(x)`` with ``weight`` plus the adapters from ``fast_adapters``, fused."""
        raise NotImplementedError

    # ----------------------------------------------------------------- nested layers
    def innermost_base(self) -> nn.Module:
        """The base module under this layer and any nested LoRA layers (what accelerate hooks)."""
        holder = self.base_layer
        while isinstance(holder, LoraLayer):
            holder = holder.base_layer
        return holder

    def runs_offloaded_base(self) -> bool:
        """True when the forward calls the base module itself where accelerate hooked it
        (``LoraLayer.forward``: the hook loads an offloaded weight for the call); a layer with
        a forward of its own (a bare parameter's, ``layers/parameter.py``) computes from the
        weight, which holds no values while offloaded."""
        return type(self).forward is LoraLayer.forward

    def extra_repr(self) -> str:
        parts = [
            f"{n}: r={self.ranks[n]}, s={self.scalings[n]:g}{', DoRA' if self.is_dora(n) else ''}"
            for n in self.ranks
        ]
        return "; ".join(parts)
