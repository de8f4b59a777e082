"""``AdapterTables``: the part of ``lorakit.layers.base.LoraLayer`` that adds and deletes named
adapters: the per-adapter tables (``ranks``, ``alphas``, ``scalings``, ``dropouts``), new factors
drawn as PEFT draws them (in float32, rounded through a float16 / bfloat16 base's dtype:
``round_through_base_dtype``), a DoRA magnitude or a bias on B beside them, and deleting one
(unmerged first). It uses the layer's ``factor_shapes``, ``init_factors``, ``store_factors``,
``base_device`` and ``base_float_dtype``. On a base that accelerate offloaded the new tensors go
to the device its hook computes on (``base_device``); what needs the base weight's values
outside a forward is refused there (``_check_offloaded_base``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit import functional
from lorakit.init_factors import DRAW_DTYPE
from lorakit.init_methods import changes_base

__all__ = ["AdapterTables", "round_through_base_dtype"]


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


class AdapterTables:
    """Add and delete a LoRA layer's named adapters (see the module docstring)."""

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
        if self.base_offload_hook() is not None:
            self._check_offloaded_base(adapter_name, init if values is None else None, use_dora)
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

    def _check_offloaded_base(
        self, adapter_name: str, init: bool | str | None, use_dora: bool
    ) -> None:
        """Refuse (``ValueError``) an adapter that would need the values of a base weight that
        accelerate offloaded (on the meta device outside the base's own call, which its hook
        wraps): DoRA (its magnitude and row norms read W0), an init that rewrites the base
        (PiSSA, OLoRA, LoftQ: an SVD of W0, then W0 overwritten), and a layer that computes
        from the weight itself instead of calling the base (a bare parameter,
        ``target_parameters``). Plain LoRA needs none of them: its factors live on the hook's
        execution device and the base is called as it is."""
        if use_dora:
            what = "DoRA (use_dora=True) reads the base weight's values at each forward"
        elif changes_base(init):
            what = f"init_lora_weights={init!r} computes the adapter from the base weight"
        elif not self.runs_offloaded_base():
            what = "an adapter on a bare parameter (target_parameters) computes from it"
        else:
            return
        base = self.base_layer
        raise ValueError(
            f"adapter {adapter_name!r}: {what}, but this {type(base).__name__} "
            f"(weight {list(self.live_weight().shape)}) is offloaded by accelerate (cpu_offload, "
            "or a device_map with 'cpu' / 'disk' entries: its weight is on the meta device "
            "outside its forward). Load the base without offloading the targeted modules "
            "(more GPU / CPU memory, or a quantized base), or use plain LoRA (use_dora=False, "
            "init_lora_weights=True, target_modules), which works on an offloaded base. "
            "Nothing was changed."
        )

    def _new_factors(
        self, rank: int, init: bool | str | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New A and B of ``factor_shapes(rank)`` in ``dtype`` on the base weight's device,
        initialised by ``init_factors`` (left uninitialised when ``init`` is None); drawn in
        float32 whatever ``dtype`` is, then cast (``init_factors.DRAW_DTYPE``: PEFT draws in
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
