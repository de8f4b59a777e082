"""Which adapters compute in ``lorakit.peft_compat.PeftModel``: the active adapters and their
changes, with PEFT's names and rules (``PeftModel`` inherits this mixin).

``active_adapters`` / ``active_adapter`` report them as PEFT does; ``set_adapter`` activates
(and makes trainable) the named ones; ``disable_adapter_layers`` / ``enable_adapter_layers``
switch every adapter off until enabled again, recorded on the wrapper (while disabled, the names
to activate on enabling are kept in ``__dict__["_active_before_disable"]``); ``delete_adapter``
removes one and chooses the adapters left active as PEFT does; ``disable_adapter()`` is a block
computing the base output. Each is a call into ``lorakit.state`` / ``lorakit.adapter_choice``.

The wrapper's state this reads and changes: ``self.model`` (the transformers model holding the
adapters), ``peft_config`` and ``unmerge_adapter`` (``PeftMergingMixin``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.adapter_choice import disabled, warn_trained_biases
from lorakit.errors import UnknownAdapterError
from lorakit.state import (
    active_adapters,
    adapter_configs,
    adapter_name_list,
    adapter_tensors,
    compute_merged_per_layer,
    delete_adapter,
    lora_layers,
    set_active,
    state_of,
)

__all__ = ["PeftActivationMixin"]


class PeftActivationMixin:
    """Active adapters for ``lorakit.peft_compat.PeftModel`` (see the module docstring)."""

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names, as PEFT reports them: also while the adapter layers are
        disabled, and without those that ``merge_adapter(adapter_names)`` only merged."""
        if self._layers_disabled:
            return list(self.__dict__["_active_before_disable"])
        return list(active_adapters(self.model))

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active), as in PEFT."""
        names = self.active_adapters
        return names[0] if len(names) == 1 else names

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active and trainable adapter (``inference_mode=True``:
        active and frozen, its trained biases too). While ``disable_adapter_layers`` holds,
        it is recorded and becomes active at ``enable_adapter_layers``, as in PEFT. A merged
        model is unmerged first, with PEFT's warning (a layer holding an earlier merge would
        otherwise keep computing it, and a later merge would add to it)."""
        names = adapter_name_list(adapter_name)
        missing = [name for name in names if name not in self.peft_config]
        if missing and self._layers_disabled:
            raise UnknownAdapterError(
                f"unknown adapter(s) {missing}; this model has {list(self.peft_config)}"
            )
        if not missing and any(layer.merged_adapters for _, layer in lora_layers(self.model)):
            warnings.warn(
                "Adapter cannot be set when the model is merged. Unmerging the model first.",
                stacklevel=2,
            )
            self.unmerge_adapter()
        if self._layers_disabled:
            self.__dict__["_active_before_disable"] = names
            return
        set_active(self.model, names)
        if inference_mode:
            _freeze_chosen(self.model)

    def disable_adapter_layers(self) -> None:
        """PEFT's: until ``enable_adapter_layers`` the model computes the base output (no
        weight changes; a merge stays) and the adapters' tensors (``adapter_tensors``) are
        frozen; biases trained by ``bias="all"`` / ``"lora_only"`` keep their flags, as in PEFT.
        Use ``with peft_model.disable_adapter():`` (or ``lorakit.disabled``) for a block."""
        if self._layers_disabled:
            return
        warn_trained_biases(self.model, "disable_adapter_layers")
        self.__dict__["_active_before_disable"] = self.active_adapters
        set_active(self.model, (), trainable=False)
        for parameter in adapter_tensors(self.model):
            parameter.requires_grad_(False)

    @property
    def _layers_disabled(self) -> bool:
        """Whether ``disable_adapter_layers`` holds (until ``enable_adapter_layers``)."""
        return "_active_before_disable" in self.__dict__

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers``: the adapters active before (or set since) are
        active and trainable again."""
        if (names := self.__dict__.pop("_active_before_disable", None)) is not None:
            set_active(self.model, [name for name in names if name in self.peft_config])
            compute_merged_per_layer(self.model)  # what merge_adapter merged while disabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter. As in PEFT, deleting an active adapter leaves the other active
        ones active (and trainable); deleting the only active one activates (and makes
        trainable) the first remaining adapter by name, with PEFT's warning."""
        was_active = self.active_adapters  # (while disabled: those enable will activate)
        delete_adapter(self.model, adapter_name)  # (its merge, if any, is undone)
        still_active = [name for name in was_active if name != adapter_name]
        remaining = sorted(adapter_configs(self.model))
        if adapter_name in was_active and not still_active and remaining:
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                f"to {remaining[0]}.",
                stacklevel=2,
            )
            still_active = remaining[:1]
        if self._layers_disabled:
            self.__dict__["_active_before_disable"] = still_active
            return
        if adapter_name in was_active and still_active:
            set_active(self.model, still_active)
        compute_merged_per_layer(self.model)  # a layer that computed only the merged one

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's output exactly (also while
        merged), without changing any weight. Biases trained by a ``bias != "none"`` adapter
        stay as trained (then the output is not the base model's: a warning says so).

        As PEFT (``disable_adapter_layers()`` on entry), every adapter's tensors are frozen
        within the block (``adapter_tensors``: LoRA factors, DoRA magnitudes, saved-module
        copies, token rows; the base model's biases keep their flags, as in PEFT). On leaving,
        also through an exception, those that were trainable on entry are trainable again:
        every flag is as it was before the block."""
        frozen = [p for p in adapter_tensors(self.model) if p.requires_grad]
        with disabled(self.model):
            for parameter in frozen:
                parameter.requires_grad_(False)
            try:
                yield
            finally:
                for parameter in frozen:
                    parameter.requires_grad_(True)


def _freeze_chosen(model: nn.Module) -> None:
    """Freeze what ``set_active`` made trainable (the active adapters and their biases)."""
    state = state_of(model)
    for parameter in state.trainable:
        parameter.requires_grad_(False)
    state.trainable = []
