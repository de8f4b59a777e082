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
- ``load_adapter`` into an adapter the model holds copies the file's tensors into it, as PEFT
  does, but refuses a file that does not fit it (other targets, ranks or scaling; PEFT loads
  what fits and keeps the adapter's ``lora_alpha``).
- Unmerging is exact (the original weights are kept while merged); ``disable_adapter()`` gives
  the exact base output even while merged and never unmerges or changes a weight.
- ``from_pretrained`` / ``load_adapter`` refuse an adapter saved on different base weights
  (``allow_base_mismatch=True`` overrides).
- ``get_peft_model`` / ``add_adapter`` refuse a ``target_modules`` list with an entry that
  matches no module (PEFT drops it silently when another entry matches).
- New LoRA layers take the training mode of the module they wrap (PEFT's dropout starts in
  train mode even in an eval-mode model).
- ``disable_adapter_layers()`` is recorded on the wrapper: until ``enable_adapter_layers()`` the
  model inside has no active adapter (``lorakit.active_adapters(peft_model.model)`` is empty),
  while ``peft_model.active_adapters`` reports them as PEFT does.
"""

from __future__ import annotations

import copyreg
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from lorakit.accounting import count_parameters
from lorakit.config import LoraConfig
from lorakit.inject import inject
from lorakit.peft_activation import PeftActivationMixin
from lorakit.peft_merging import PeftMergingMixin
from lorakit.peft_model_extras import PeftFilesMixin, base_dtype, record_task_heads
from lorakit.peft_rows import batch_size, rows_routed, sequences_per_row
from lorakit.peft_state_dict import PeftStateDictMixin
from lorakit.peft_trainer import PeftTrainerMixin
from lorakit.peft_wrapper_class import remade_wrapper, wrapper_class
from lorakit.state import adapter_configs

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
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)


class PeftModel(
    PeftActivationMixin,
    PeftFilesMixin,
    PeftTrainerMixin,
    PeftMergingMixin,
    PeftStateDictMixin,
    nn.Module,
):
    """PEFT's ``PeftModel`` methods around a transformers model that holds lorakit adapters.

    ``PeftModel(model, peft_config, adapter_name="default")`` injects the adapter, as
    ``get_peft_model`` does; ``PeftModel(model)`` wraps a model that holds adapters already.
    The instance is of the subclass ``PeftModelFor<ModelClass>`` (``peft_wrapper_class``), whose
    ``forward`` shows the model's signature (transformers' ``Trainer`` reads it).
    ``forward`` and ``generate`` call the transformers model (``self.model``) with the same
    arguments; the active adapters apply. Attributes not defined here are the model's.
    Which adapters are active, and their changes (``set_adapter``, ``delete_adapter``, disabling
    and enabling the adapter layers), are in ``peft_activation``.
    """

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> PeftModel:
        if cls is PeftModel and isinstance(model, nn.Module):
            cls = wrapper_class(PeftModel, type(model))
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig | None = None,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """``low_cpu_mem_usage`` (PEFT's) is accepted and has no effect."""
        if isinstance(model, PeftModel):
            raise TypeError(
                "got a model that is already a lorakit PeftModel; add another adapter with "
                "peft_model.add_adapter(name, config) instead."
            )
        if peft_config is not None:
            _check_config(peft_config)
            adapter_dtype = None if autocast_adapter_dtype else base_dtype(model)
            inject(model, peft_config, adapter_name, adapter_dtype=adapter_dtype)
            record_task_heads(model, adapter_name)
        super().__init__()
        self.model = self._prepared_for_checkpointing(model)
        self.training = model.training  # the wrapper reports the model's mode

    def __reduce__(self) -> tuple:
        """Pickle by the wrapped model's class (``PeftModelFor<...>`` is made at run time)."""
        if type(self) is wrapper_class(PeftModel, type(self.model)):
            return remade_wrapper, (PeftModel, type(self.model)), self.__dict__
        return copyreg.__newobj__, (type(self),), self.__dict__

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent while copying or unpickling
            if modules is None or "model" not in modules or name == "model":
                raise
            model = modules["model"]
        try:
            return getattr(model, name)
        except AttributeError:
            raise AttributeError(
                f"lorakit.PeftModel has no attribute {name!r} (nor has the wrapped "
                f"{type(model).__name__}); docs/migrating-from-peft.md lists the PEFT methods "
                "lorakit implements and their lorakit equivalents."
            ) from None

    # ------------------------------------------------------------------ adapters
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """``{adapter_name: LoraConfig}``."""
        return adapter_configs(self.model)

    @property
    def active_peft_config(self) -> LoraConfig:
        """The active adapter's config (``peft_config[active_adapter]``, as in PEFT)."""
        names = self.active_adapters
        if len(names) != 1:
            raise ValueError(
                f"active_peft_config needs exactly one active adapter; active: {names}. Read "
                f"peft_model.peft_config[name] for one of {list(self.peft_config)}."
            )
        return self.peft_config[names[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        """PEFT's: the ``modules_to_save`` names of every adapter's config, as one set (None
        when no adapter saves a module); a task type's heads included, as PEFT's task models
        add them (``{"classifier", "score"}`` for ``SEQ_CLS``: ``record_task_heads``)."""
        names = {name for c in self.peft_config.values() for name in c.modules_to_save or ()}
        return names or None

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter; it is not made active (as in PEFT: call ``set_adapter``).
        ``autocast_adapter_dtype=False`` keeps it in the base dtype (default: float32 on a
        float16/bfloat16 base); ``low_cpu_mem_usage`` is accepted and has no effect."""
        _check_config(peft_config)
        adapter_dtype = None if autocast_adapter_dtype else base_dtype(self.model)
        inject(self.model, peft_config, adapter_name, adapter_dtype=adapter_dtype, activate=False)
        record_task_heads(self.model, adapter_name)

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts."""
        counts = count_parameters(self.model)
        return counts.trainable, counts.total

    def print_trainable_parameters(self) -> None:
        """``trainable params: ... || all params: ... || trainable%: ...``"""
        print(count_parameters(self.model))

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
        expand = sequences_per_row(self.model, args, kwargs)
        with self.rows_routed(adapter_names, batch_size(args, kwargs), expand):
            return self.model.generate(*args, **kwargs)

    def rows_routed(
        self, adapter_names: Sequence[str], batch: int | None = None, sequences_per_row: int = 1
    ) -> AbstractContextManager[None]:
        """Within the block row ``i`` of every forward adds adapter ``adapter_names[i]`` alone
        (``"__base__"``: none); inference only (``lorakit.peft_rows.rows_routed``). A layer
        seeing other than ``len(adapter_names)`` rows (or ``sequences_per_row`` times as many:
        beams of a ``generate`` called within) refuses with a ``ValueError``."""
        return rows_routed(self.model, adapter_names, batch, sequences_per_row)


def _check_config(config: Any) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"expected a lorakit.LoraConfig, got {type(config).__module__}."
            f"{type(config).__qualname__}; import LoraConfig from lorakit (same field names "
            "as peft's), or convert a peft LoraConfig with "
            "lorakit.LoraConfig(**peft_config.to_dict())."
        )
