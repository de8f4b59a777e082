"""``PeftModel``'s methods that fold adapters into the weights, take them out again, or combine
them (PEFT's names and arguments; ``lorakit.peft_compat`` has the class and its docstring).
Each is one call into lorakit's own API (``lorakit.merge``, ``lorakit.inject.unload``,
``lorakit.combining.peft_names``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lorakit.inject import unload
from lorakit.layers import TrainableTokens
from lorakit.merge import merge, merge_and_unload, unmerge
from lorakit.state import active_adapters, compute_merged_per_layer, saved_modules, set_active

__all__ = ["PeftMergingMixin"]


class PeftMergingMixin:
    """Merging, unloading and combining for ``lorakit.peft_compat.PeftModel``: ``self.model``
    is the transformers model that holds the adapters; ``self.active_adapters`` and
    ``self._layers_disabled`` are the wrapper's."""

    def merge_adapter(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Fold the (active) adapters into the weights; ``unmerge_adapter`` undoes it exactly.
        ``safe_merge`` is PEFT's argument: lorakit always checks the merged weights for
        inf/NaN before installing any (``lorakit.merge``).

        As in PEFT, the active adapters stay active (``active_adapters`` does not change, nor
        does any ``requires_grad`` flag), and after every merge each LoRA layer computes PEFT's
        result: a layer holding merged adapters (of this call or an earlier one) its merged
        weight ``W0 + sum_a s_a B_a A_a`` alone, any other layer its active adapters
        (``lorakit.state.compute_merged_per_layer``) until ``unmerge_adapter`` or
        ``set_adapter``. Trainable token rows follow the same rule: an embedding holding
        merged adapters' rows looks tokens up with those rows alone (``_compute_merged_rows``).
        After ``disable_adapter_layers`` it only merges (the active adapters when no names are
        given); the model computes the base output until ``enable_adapter_layers``, which
        applies that rule to the LoRA layers."""
        merge(self, adapter_names)  # (disabled: the wrapper's active ones, as PEFT merges them)
        if not self._layers_disabled:
            compute_merged_per_layer(self.model)
            _compute_merged_rows(self.model)

    def unmerge_adapter(self) -> None:
        """Undo every merge exactly; every layer computes the active adapters again."""
        unmerge(self.model)
        set_active(self.model, active_adapters(self.model), trainable=False)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> nn.Module:
        """The plain transformers model with the (active) adapters folded into its weights.
        PEFT's signature: ``progressbar`` (no bar is shown: the merge is one pass) and
        ``safe_merge`` (always on: ``lorakit.merge`` checks before it installs) are accepted.
        After ``disable_adapter_layers`` the active adapters are merged all the same, as in
        PEFT (``lorakit.merge_and_unload`` given the wrapper does the same)."""
        return merge_and_unload(self, adapter_names)

    def unload(self) -> nn.Module:
        """The plain transformers model with its original weights and modules (adapters
        dropped), as peft 0.22 gives it back: a ``modules_to_save`` module is the original one
        (peft before 0.22 put the active adapter's trained copy there; ``merge_and_unload()``
        keeps that copy). A merged model is unmerged first (exactly), so its weights are the
        base's, as PEFT's docstring says; peft 0.21 keeps the merged weights:
        ``merge_and_unload()`` does that."""
        return unload(self.model)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        *,
        seed: int = 0,
    ) -> None:
        """PEFT's ``add_weighted_adapter``, with PEFT's arguments in PEFT's order (positional
        calls work as in peft 0.21): a new adapter from ``adapters`` and ``weights``, every
        method on the updates ``ΔW = s B A`` (``lorakit.combining.peft_names`` has the names,
        the options and the PEFT methods refused because they combine A and B apart). ``seed``
        (DARE's masks) is lorakit's, keyword-only. Refusals are ``ValueError``."""
        from lorakit.combining.peft_names import add_weighted_adapter

        add_weighted_adapter(
            self.model,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank,
            svd_clamp,
            svd_full_matrices,
            svd_driver,
            density,
            majority_sign_method,
            seed=seed,
        )


def _compute_merged_rows(model: nn.Module) -> None:
    """PEFT's rule for trainable token rows after ``merge_adapter``, as
    ``state.compute_merged_per_layer`` applies it to LoRA layers: an embedding holding merged
    adapters' rows (``TrainableTokens.merged_adapters``) uses those rows alone, whichever
    adapters are active (PEFT's wrapper then looks tokens up in its merged weight); any other
    the active adapters' rows. ``unmerge_adapter`` / ``set_adapter`` choose the active ones
    again."""
    active = active_adapters(model)
    for _, wrapper in saved_modules(model):
        if isinstance(wrapper, TrainableTokens):
            own = tuple(name for name in active if name in wrapper.modules_to_save)
            wrapper.active_adapters = tuple(wrapper.merged_adapters) or own
