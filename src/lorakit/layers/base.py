"""``LoraLayer``: what every LoRA layer shares: named adapters, the forward, merge state.

A LoRA layer WRAPS the original module, kept as ``base_layer``; ``lorakit.unload`` puts that very
object back. Subclasses (``LoraLinear``, ``LoraEmbedding``) give the factors' shapes and init
rule and compute the base and the low-rank branch (``lorakit.functional``). ``forward`` is the
whole layer: ``h = base(x) + sum_a s_a B_a A_a dropout(x)`` by one of four named paths (a DoRA
adapter adds ``(f - 1) W0 x~ + f s B A x~`` instead: ``dora_branch``, ``layers/dora.py``).

Merging and unmerging (``lorakit.layers.merging``, the ``Merging`` half of the class) replace
the layer's ``MergeState`` whole and a forward reads it once, so a forward running in another
thread during a merge sees each layer before or after it, never half-way: every layer computes
``W0 x + s B A x``, merged or not (equal within rounding); which layers of the model it sees
merged is not defined. A base layer called as a module (hooks, extra arguments, a subclass)
reads its own weight when it runs and is not covered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit import functional
from lorakit.init_methods import DRAW_DTYPE
from lorakit.layers.merging import Merging, unmerged
from lorakit.layers.per_call import current_override, current_router

__all__ = ["LoraLayer", "round_through_base_dtype"]


def _same_adapters(chosen: tuple[str, ...], merged: tuple[str, ...]) -> bool:
    return chosen == merged or (bool(merged) and set(chosen) == set(merged))


def round_through_base_dtype(factors: Sequence[torch.Tensor], base_dtype: torch.dtype) -> None:
    """Round float32 ``factors`` in place to the nearest ``base_dtype`` values when the base is
    float16 or bfloat16 (``t = float32(base_dtype(t))``; they stay float32 tensors).

    Why: PEFT draws the factors in float32, casts the adapter to the base dtype and back to
    float32 (``autocast_adapter_dtype=True``), so its default-init factors on a half base are
    the rounded draws; doing the same makes a seed give PEFT's factors bit for bit. Other
    dtypes (a float32 or float64 base, a quantized base that reports float32, or factors not
    in float32) are left as they are."""
    if base_dtype not in (torch.float16, torch.bfloat16):
        return
    for factor in factors:
        if factor.dtype == torch.float32:
            factor.copy_(factor.to(base_dtype))


class LoraLayer(Merging, nn.Module):
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
        fast_adapters = None if args or kwargs else self.fast_adapters(x, original, adapters)
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
        return bool(args or kwargs) or not self.base_is_plain()

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
        """``s * B A`` in float32, laid out like ``base_layer.weight``."""
        raise NotImplementedError

    def merge_delta(self, adapter_name: str) -> torch.Tensor:
        """What merging the adapter adds to the original weight (float32, laid out like it):
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

    # ----------------------------------------------------------------- adapters
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    def live_weight(self) -> torch.Tensor:
        """The weight the base holds now, merged or not: ``base_layer.weight`` (a layer on a
        bare parameter, ``layers/parameter.py``, that parameter)."""
        return self.base_layer.weight

    def set_live_weight(self, weight: nn.Parameter) -> None:
        """Install ``weight`` where ``live_weight`` reads it (merge and unmerge)."""
        self.base_layer.weight = weight

    @property
    def base_device(self) -> torch.device:
        """The device of the base layer's weight (where new adapter tensors go)."""
        return self.live_weight().device

    @property
    def base_float_dtype(self) -> torch.dtype:
        """The base weight's dtype (a quantized base says float32): sets the adapter's default
        dtype (float32 on a float16/bfloat16 base, else this)."""
        return self.live_weight().dtype

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
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Create adapter tensors; ``init`` is ``LoraConfig.init_lora_weights``, or None to
        leave them uninitialised (their values are about to be copied in from a file).
        ``values = (A, B)``: take these tensors as the adapter's (moved to the base weight's
        device and ``dtype``; no copy when they already fit, so the caller must hand them over).
        ``use_dora``: also a DoRA magnitude vector (``add_magnitude``); ``lora_bias``: also a
        bias on B (``add_lora_bias``)."""
        if lora_bias and not self.supports_lora_bias:
            raise ValueError(
                f"lora_bias=True is not supported for {type(self.base_layer).__name__} layers "
                "(lorakit, like PEFT, implements it for nn.Linear and transformers Conv1D); "
                "remove this module from target_modules or set lora_bias=False."
            )
        if use_dora and not self.supports_dora:
            raise ValueError(
                f"DoRA (use_dora=True) is not supported for {type(self.base_layer).__name__} "
                "layers (lorakit implements it for nn.Linear and transformers Conv1D); remove "
                "this module from target_modules or set use_dora=False."
            )
        if adapter_name in self.ranks:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        bias = None
        if values is not None:
            expected = self.factor_shapes(rank)
            if (tuple(values[0].shape), tuple(values[1].shape)) != expected:
                raise ValueError(
                    f"adapter {adapter_name!r}: factors of shapes {tuple(values[0].shape)}, "
                    f"{tuple(values[1].shape)} given; rank {rank} needs {expected}"
                )
            device = self.base_device
            values = (values[0].to(device, dtype), values[1].to(device, dtype))
        elif lora_bias and init is not None:  # PEFT draws B's bias before A's init draw
            *values, bias = self.new_factors_with_bias(rank, init, dtype)  # (lora_bias.py)
        else:
            values = self._new_factors(rank, init, dtype)
        self.store_factors(adapter_name, *values)
        self.ranks[adapter_name] = rank
        self.alphas[adapter_name] = alpha
        self.scalings[adapter_name] = functional.scaling(rank, alpha, use_rslora)
        self.dropouts[adapter_name] = dropout
        if use_dora:
            self.add_magnitude(adapter_name, init is not None)  # a supports_dora layer's
        if lora_bias:
            self.add_lora_bias(adapter_name, init, bias)  # a supports_lora_bias layer's

    def _new_factors(
        self, rank: int, init: bool | str | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New A and B of ``factor_shapes(rank)`` in ``dtype`` on the base weight's device,
        initialised by ``init_factors`` (left uninitialised when ``init`` is None); drawn in
        float32 whatever ``dtype`` is, then cast (``init_methods.DRAW_DTYPE``: PEFT draws in
        float32, ``nn.Linear``'s and ``torch.randn``'s default, and casts to the base dtype, so
        a seed gives PEFT's factors on a float64 base too; a bfloat16 draw lands elements near
        a rounding boundary on other values). The drawn inits (True, False, "gaussian",
        "orthogonal") on a float16 / bfloat16 base are rounded through its dtype first
        (``round_through_base_dtype``), as PEFT's cast to it and back rounds them."""
        device = self.base_device
        shape_A, shape_B = self.factor_shapes(rank)
        drawn = DRAW_DTYPE if init is not None else dtype
        lora_A = torch.empty(shape_A, device=device, dtype=drawn)
        lora_B = torch.empty(shape_B, device=device, dtype=drawn)
        if init is not None:
            self.init_factors(lora_A, lora_B, init)
        if init is True or init is False or init in ("gaussian", "orthogonal"):  # (drawn ones)
            round_through_base_dtype((lora_A, lora_B), self.base_float_dtype)  # as PEFT's
        return lora_A.to(dtype), lora_B.to(dtype)

    def delete_adapter(self, adapter_name: str, remerge: tuple | None = None) -> None:
        """Remove the adapter's tensors; a merged one is unmerged first and the other merged
        adapters merged back. ``remerge``: that merge, from ``prepare_delete`` (computed here
        when not given), so a ValueError about it leaves the layer as it was."""
        if adapter_name in self.merged_adapters:
            if remerge is None:
                remerge = self.prepare_delete(adapter_name)
            self.unmerge()
            if remerge is not None:
                self.install_merge(remerge)
        self._delete_adapter_tensors(adapter_name)
        for table in (self.ranks, self.alphas, self.scalings, self.dropouts):
            table.pop(adapter_name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != adapter_name)

    def extra_repr(self) -> str:
        parts = [
            f"{n}: r={self.ranks[n]}, s={self.scalings[n]:g}{', DoRA' if self.is_dora(n) else ''}"
            for n in self.ranks
        ]
        return "; ".join(parts)
