"""PEFT's front door over lorakit: ``get_peft_model`` and ``PeftModel`` with PEFT's method names.

Code written for HuggingFace PEFT runs by changing the import::

    from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model

Every method is one call into lorakit's own API (``inject``, ``set_active``, ``disabled``,
``merge_and_unload``, ``lorakit.io``); nothing is implemented twice. The adapters live IN the
transformers model (its target modules are wrapped in place), so the wrapped model also works on
its own, and ``PeftModel`` only adds the PEFT-named methods around it.

Deliberate differences from PEFT (docs/migrating-from-peft.md):

- ``peft_model.model`` and ``get_base_model()`` are the transformers model, as in PEFT. Any other
  attribute is the transformers model's, so ``peft_model.base_model`` is its backbone (what
  transformers means by ``base_model``, and what trainers such as TRL's ``SFTTrainer`` call),
  not PEFT's ``LoraModel`` tuner: write ``peft_model.model`` where PEFT code says
  ``peft_model.base_model.model``.
- Unmerging is exact (the original weights are kept while merged); ``disable_adapter()`` gives
  the exact base output even while merged and never unmerges or changes a weight.
- ``from_pretrained`` / ``load_adapter`` refuse an adapter saved on different base weights
  (``allow_base_mismatch=True`` overrides).
- ``get_peft_model`` / ``add_adapter`` refuse a ``target_modules`` list with an entry that
  matches no module (PEFT drops it silently when another entry matches).
- New LoRA layers take the training mode of the module they wrap (PEFT's dropout starts in
  train mode even in an eval-mode model).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.accounting import count_parameters
from lorakit.config import LoraConfig
from lorakit.inject import freeze_adapter, inject, unload
from lorakit.merge import merge, merge_and_unload, unmerge
from lorakit.peft_rows import batch_size, rows_routed
from lorakit.state import (
    active_adapters,
    adapter_configs,
    adapter_name_list,
    delete_adapter,
    disabled,
    set_active,
)

__all__ = ["PeftModel", "get_peft_model"]


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """PEFT's ``get_peft_model``: inject adapter ``adapter_name`` into ``model`` and wrap it.

    ``autocast_adapter_dtype`` (PEFT's meaning): adapters in float32 on a float16/bfloat16 base;
    False keeps them in the base dtype.
    """
    if isinstance(model, PeftModel):
        raise TypeError(
            "get_peft_model got a model that is already a lorakit PeftModel; add another adapter "
            "with peft_model.add_adapter(name, config) instead."
        )
    _check_config(peft_config)
    adapter_dtype = None if autocast_adapter_dtype else _base_dtype(model)
    inject(model, peft_config, adapter_name, adapter_dtype=adapter_dtype)
    return PeftModel(model)


class PeftModel(nn.Module):
    """PEFT's ``PeftModel`` methods around a transformers model that holds lorakit adapters.

    ``forward`` and ``generate`` call the transformers model (``self.model``) with the same
    arguments; the active adapters apply. Attributes not defined here are the model's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper reports the model's mode

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent while copying or unpickling
            if modules is None or "model" not in modules or name == "model":
                raise
            return getattr(modules["model"], name)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        allow_base_mismatch: bool = False,
        subfolder: str | None = None,
    ) -> PeftModel:
        """Load the adapter saved in directory ``model_id`` (or ``model_id/subfolder``) onto
        ``model`` and wrap it. As in PEFT, ``adapter_name`` only names it: an adapter that
        ``save_pretrained`` wrote in ``model_id/<name>`` loads with ``subfolder=<name>``.

        ``is_trainable=False`` (PEFT's default) loads it frozen, for inference, and puts the
        whole model in eval mode (dropout off), as PEFT does. ``is_trainable=True`` leaves the
        model's mode as it was; the new LoRA layers take the mode of the modules they wrap.
        """
        wrapper = cls(model)
        wrapper.load_adapter(
            model_id,
            adapter_name,
            is_trainable,
            allow_base_mismatch=allow_base_mismatch,
            subfolder=subfolder,
        )
        wrapper.set_adapter(adapter_name)
        if not is_trainable:
            freeze_adapter(model, adapter_name)
        return wrapper

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        *,
        allow_base_mismatch: bool = False,
        subfolder: str | None = None,
    ) -> None:
        """Load another adapter from directory ``model_id`` (or ``model_id/subfolder``, PEFT's
        argument); the active adapters stay as they were (unless the model had none). Unless
        ``is_trainable``: frozen, and the whole model in eval mode, as PEFT does."""
        from lorakit.io import load_adapter

        load_adapter(
            self.model,
            model_id,
            adapter_name,
            allow_base_mismatch=allow_base_mismatch,
            subfolder=subfolder,
        )
        if not is_trainable:
            freeze_adapter(self.model, adapter_name)
            self.eval()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: Sequence[str] | None = None,
        *,
        safe_serialization: bool = True,
        save_embedding_layers: bool | str | None = None,
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
    ) -> None:
        """Save adapters in PEFT's format: ``default`` in ``save_directory``, any other adapter
        in ``save_directory/<name>`` (PEFT's layout). Only the main process writes.
        ``path_initial_model_for_weight_conversion``: the PiSSA/OLoRA adapter as saved before
        training; each adapter is saved converted into a plain LoRA for the original base
        (``save_adapter(..., initial_adapter=...)``). Unlike peft, that directory is only read."""
        from lorakit.io import save_adapter

        if not safe_serialization:
            raise ValueError(
                "safe_serialization=False asks for a pickle file (adapter_model.bin); lorakit "
                "writes safetensors only, which peft, vLLM and LoRAX all read. Drop the argument."
            )
        if not is_main_process:
            return
        for adapter_name in selected_adapters or list(self.peft_config):
            save_adapter(
                self.model,
                save_directory,
                adapter_name,
                save_embedding_layers=save_embedding_layers,
                initial_adapter=path_initial_model_for_weight_conversion,
            )

    # ------------------------------------------------------------------ adapters
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """``{adapter_name: LoraConfig}``."""
        return adapter_configs(self.model)

    @property
    def active_adapters(self) -> list[str]:
        return list(active_adapters(self.model))

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active), as in PEFT."""
        names = self.active_adapters
        return names[0] if len(names) == 1 else names

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter; it is not made active (as in PEFT: call ``set_adapter``)."""
        _check_config(peft_config)
        inject(self.model, peft_config, adapter_name, activate=False)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` the active (and trainable) adapter."""
        set_active(self.model, [adapter_name] if isinstance(adapter_name, str) else adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter. As in PEFT, deleting an active adapter leaves the other active
        ones active (and trainable); deleting the only active one activates (and makes
        trainable) the first remaining adapter by name, with PEFT's warning."""
        was_active = active_adapters(self.model)
        delete_adapter(self.model, adapter_name)
        if adapter_name not in was_active:
            return
        still_active = [name for name in was_active if name != adapter_name]
        remaining = sorted(adapter_configs(self.model))
        if not still_active and remaining:
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                f"to {remaining[0]}.",
                stacklevel=2,
            )
            still_active = remaining[:1]
        if still_active:
            set_active(self.model, still_active)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes the base model's output exactly (also while
        merged), without changing any weight."""
        with disabled(self.model):
            yield

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts."""
        counts = count_parameters(self.model)
        return counts.trainable, counts.total

    def print_trainable_parameters(self) -> None:
        """``trainable params: ... || all params: ... || trainable%: ...``"""
        print(count_parameters(self.model))

    # ------------------------------------------------------------------ merging
    def merge_adapter(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Fold the (active) adapters into the weights; ``unmerge_adapter`` undoes it exactly.
        ``safe_merge`` is PEFT's argument: lorakit always checks the merged weights for
        inf/NaN before installing any (``lorakit.merge``).

        As in PEFT, the model then computes the merged weights: ``adapter_names`` other than the
        active adapters become the active ones while merged (no ``requires_grad`` flag changes),
        and ``unmerge_adapter`` makes the adapters active before the merge active again."""
        before = active_adapters(self.model)
        merge(self.model, adapter_names)
        if adapter_names is None:
            return
        names = adapter_name_list(adapter_names)
        if set(names) != set(before):
            set_active(self.model, names, trainable=False)
            self.__dict__["_active_before_merge"] = (before, names)

    def unmerge_adapter(self) -> None:
        """Undo every merge exactly (and bring back the adapters active before
        ``merge_adapter(adapter_names)`` changed them)."""
        unmerge(self.model)
        before, merged = self.__dict__.pop("_active_before_merge", ((), None))
        if merged is not None and active_adapters(self.model) == merged:
            set_active(self.model, [n for n in before if n in self.peft_config], trainable=False)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> nn.Module:
        """The plain transformers model with the (active) adapters folded into its weights.
        PEFT's signature: ``progressbar`` (no bar is shown: the merge is one pass) and
        ``safe_merge`` (always on: ``lorakit.merge`` checks before it installs) are accepted."""
        return merge_and_unload(self.model, adapter_names)

    def unload(self) -> nn.Module:
        """The plain transformers model with its original weights (adapters dropped)."""
        return unload(self.model)

    def get_base_model(self) -> nn.Module:
        """The transformers model (holding the adapters)."""
        return self.model

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The transformers model's forward. ``adapter_names`` (PEFT's mixed batch): one
        adapter name per row of the batch (``"__base__"``: no adapter); each row then computes
        what it computes with its adapter alone (see ``rows_routed``)."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.rows_routed(adapter_names, batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """The transformers model's ``generate``; ``adapter_names`` as in ``forward`` (every
        step of each row's sequence, its beams included, takes the row's adapter)."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.rows_routed(adapter_names, batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    def rows_routed(
        self, adapter_names: Sequence[str], batch: int | None = None
    ) -> AbstractContextManager[None]:
        """Within the block row ``i`` of every forward adds adapter ``adapter_names[i]`` alone
        (``"__base__"``: none); inference only (``lorakit.peft_rows.rows_routed``)."""
        return rows_routed(self.model, adapter_names, batch)

    # ------------------------------------------------------------------ combining
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        **options: Any,
    ) -> None:
        """PEFT's ``add_weighted_adapter``: a new adapter from ``adapters`` and ``weights``, every
        method on the updates ``ΔW = s B A`` (``lorakit.combining.peft_names`` has the names,
        the options and the PEFT methods refused because they combine A and B apart)."""
        from lorakit.combining.peft_names import add_weighted_adapter

        add_weighted_adapter(
            self.model, adapters, weights, adapter_name, combination_type, svd_rank, **options
        )


def _check_config(config: Any) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"expected a lorakit.LoraConfig, got {type(config).__module__}."
            f"{type(config).__qualname__}; import LoraConfig from lorakit (same field names "
            "as peft's), or convert a peft LoraConfig with "
            "lorakit.LoraConfig(**peft_config.to_dict())."
        )


def _base_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
