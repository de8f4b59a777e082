"""``LoraLayer``: the bookkeeping every LoRA layer shares (named adapters, activity, merge state).

A LoRA layer WRAPS the original module, kept as ``base_layer``; ``lorakit.unload`` puts that very
object back. Subclasses add the adapter tensors and say how the low-rank branch is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit import functional
from lorakit.layers.per_call import current_override, current_router

__all__ = ["LoraLayer"]


class LoraLayer(nn.Module):
    """Common state of a module with LoRA adapters beside a frozen ``base_layer``.

    Per adapter name: ``ranks[name]`` (r), ``alphas[name]``, ``scalings[name]`` (s) and
    ``dropouts[name]`` (p). ``active_adapters`` are added to the output; ``merged_adapters``
    are folded into the base weight. Merging installs a NEW weight Parameter and keeps the
    original one aside, so unmerging is exact and a weight tied to another module (an output
    embedding) is never changed behind that module's back.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.scalings: dict[str, float] = {}
        self.dropouts: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        # While merged: the original weight Parameter (in a tuple so it is not registered as a
        # parameter of this layer). Modules tied to it (e.g. an output embedding) keep using it.
        self._original_parameter: tuple[nn.Parameter, ...] = ()

    # ----------------------------------------------------------------- subclass interface
    def _create_adapter(
        self,
        adapter_name: str,
        rank: int,
        init: bool | str | None,
        dtype: torch.dtype,
        values: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
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
        """``s * B A`` in float32, laid out like ``base_layer.weight``."""
        raise NotImplementedError

    def lora_branch(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The low-rank output of one adapter for input ``x``."""
        raise NotImplementedError

    def base_forward_with_weight(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output computed with ``weight`` in place of its own."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor | None:
        """``base(x)`` plus the named adapters in one fused pass (``lorakit.fast``), or None
        where the layer has no fast path for this call (the plain path is then taken)."""
        return None

    # ----------------------------------------------------------------- adapters
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.ranks)

    def add_adapter(
        self,
        adapter_name: str,
        rank: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        init: bool | str | None,
        dtype: torch.dtype,
        values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Create adapter tensors; ``init`` is ``LoraConfig.init_lora_weights``, or None to
        leave them uninitialised (their values are about to be copied in from a file).
        ``values = (A, B)``: take these tensors as the adapter's (moved to the base weight's
        device and ``dtype``; no copy when they already fit, so the caller must hand them over)."""
        if adapter_name in self.ranks:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if values is not None:
            expected = self.factor_shapes(rank)
            if (tuple(values[0].shape), tuple(values[1].shape)) != expected:
                raise ValueError(
                    f"adapter {adapter_name!r}: factors of shapes {tuple(values[0].shape)}, "
                    f"{tuple(values[1].shape)} given; rank {rank} needs {expected}"
                )
            device = self.base_layer.weight.device
            values = (values[0].to(device, dtype), values[1].to(device, dtype))
        self._create_adapter(adapter_name, rank, init, dtype, values)
        self.ranks[adapter_name] = rank
        self.alphas[adapter_name] = alpha
        self.scalings[adapter_name] = functional.scaling(rank, alpha, use_rslora)
        self.dropouts[adapter_name] = dropout

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            still_merged = [name for name in self.merged_adapters if name != adapter_name]
            self.unmerge()
            self.merge(still_merged)
        self._delete_adapter_tensors(adapter_name)
        for table in (self.ranks, self.alphas, self.scalings, self.dropouts):
            table.pop(adapter_name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter_name)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        router = current_router()
        if router is not None:
            return router(self, x, self.base_layer(x, *args, **kwargs))
        override = current_override(self)
        active = self.active_adapters if override is None else override
        active = tuple(name for name in active if name in self.ranks)
        if not self.merged_adapters:
            fused = None if args or kwargs else self.fused_forward(x, active)
            if fused is not None:
                return fused
            out = self.base_layer(x, *args, **kwargs)
            pending = active
        elif set(active) == set(self.merged_adapters):
            return self.base_layer(x, *args, **kwargs)
        else:
            out = self.base_forward_with_weight(self.original_weight, x)
            pending = active
        in_place = not torch.is_grad_enabled()  # out is the base layer's fresh output
        for name in pending:
            branch = self.lora_branch(name, x)
            out = out.add_(branch) if in_place else out + branch.to(out.dtype)
        return out

    # ----------------------------------------------------------------- merge
    def merge(self, adapter_names: Sequence[str]) -> None:
        """Fold ``s B A`` of each named adapter into the base weight (idempotent, exact undo).

        Raises ValueError (and leaves the weight untouched) if a delta is not finite.
        """
        prepared = self.prepare_merge(adapter_names)
        if prepared is not None:
            self.install_merge(prepared)

    def prepare_merge(
        self, adapter_names: Sequence[str]
    ) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """``(names, W)``: the weight with the named adapters merged, ``W0 + sum_a s_a B_a A_a``
        (float32 sum, rounded once to W0's dtype), for the adapters not merged yet; None if
        there are none. Changes nothing; raises ValueError if W would hold inf/NaN."""
        to_merge = tuple(name for name in adapter_names if name not in self.merged_adapters)
        if not to_merge:
            return None
        original = self.original_weight
        delta = self._merged_delta((*self.merged_adapters, *to_merge))
        merged = (original.detach().to(torch.float32) + delta).to(original.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging adapter(s) {list(to_merge)} would put non-finite values into the base "
                "weight (the adapter holds inf/NaN or overflows the weight dtype); nothing was "
                "changed."
            )
        return to_merge, merged

    def install_merge(self, prepared: tuple[tuple[str, ...], torch.Tensor]) -> None:
        """Install a weight from ``prepare_merge``, keeping the original Parameter for unmerge."""
        to_merge, merged = prepared
        self._original_parameter = (self.original_weight,)
        self.base_layer.weight = nn.Parameter(merged, requires_grad=False)
        self.merged_adapters = (*self.merged_adapters, *to_merge)

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter (the very tensor the model was built with)."""
        return self._original_parameter[0] if self.merged_adapters else self.base_layer.weight

    def unmerge(self) -> None:
        """Put the original weight Parameter back: bit-identical, and ties to it restored."""
        if not self.merged_adapters:
            return
        self.base_layer.weight = self._original_parameter[0]
        self._original_parameter = ()
        self.merged_adapters = ()

    def forget_original(self) -> None:
        """Keep the merged weight for good (used by ``merge_and_unload``)."""
        self._original_parameter = ()
        self.merged_adapters = ()

    def _merged_delta(self, adapter_names: Sequence[str]) -> torch.Tensor:
        total = None
        for name in adapter_names:
            delta = self.delta_weight(name)
            if not torch.isfinite(delta).all():
                raise ValueError(
                    f"adapter {name!r} holds non-finite values (inf/NaN); refusing to merge it "
                    "into the base weight. Nothing was changed."
                )
            total = delta if total is None else total + delta
        return total

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.ranks[n]}, s={self.scalings[n]:g}" for n in self.ranks]
        return "; ".join(parts)
