"""Which adapters a merge folds in (``lorakit.merge``, ``merge_and_unload``,
``io.save_merged_model``): the named ones, else the active ones.

The active ones are the model's (``lorakit.active_adapters``), except on lorakit's
``PeftModel`` wrapper after ``disable_adapter_layers()``: the model inside it then has none
active (its forwards give the base output), and the wrapper's ``active_adapters`` (those
``enable_adapter_layers()`` will activate) are merged, as PEFT merges them. A model with
adapters of which none is active and none merged yet (``set_active(model, ())``, or the model
inside a disabled wrapper given alone) is refused: the merge would fold in nothing, and
``merge_and_unload`` / ``save_merged_model`` would give back the base model as if merged.
Named adapters of which two hold ``modules_to_save`` copies of one module are refused by
``merge_and_unload`` (``refuse_two_copies``): one module can keep one copy (peft 0.22 refuses).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lorakit.errors import UnknownAdapterError
from lorakit.layers import TrainableTokens
from lorakit.state import (
    active_adapters,
    adapter_name_list,
    lora_layers,
    saved_modules,
    state_of,
)

__all__ = ["chosen_adapters", "refuse_two_copies"]


def chosen_adapters(
    model: nn.Module, adapter_names: Sequence[str] | None, what: str = "merge"
) -> tuple[str, ...]:
    """The adapters ``what`` (the caller's name, for messages) folds into ``model``:
    ``adapter_names`` when given (``[]``: none, on purpose), else the active ones (a disabled
    ``PeftModel`` wrapper's: ``_wrapper_choice``). ``ValueError`` when this model has no lorakit
    state; ``UnknownAdapterError`` naming adapters it does not hold; ``ValueError`` when none is
    given and none is active or merged while the model has adapters (``_refuse_nothing``).
    Raises before any change."""
    state = state_of(model)
    if state is None:
        raise ValueError(
            f"this {type(model).__name__} has no lorakit adapters (call {what} on the model that "
            "lorakit.inject or lorakit.load_adapter returned)"
        )
    if adapter_names is None:
        names = _wrapper_choice(model)
        names = active_adapters(model) if names is None else names
    else:
        names = adapter_name_list(adapter_names)
    known = tuple(state.configs)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UnknownAdapterError(f"unknown adapter(s) {unknown}; this model has {list(known)}")
    if adapter_names is None and not names and known:
        _refuse_nothing(model, known, what)
    return names


def _wrapper_choice(model: nn.Module) -> tuple[str, ...] | None:
    """The ``active_adapters`` of the first lorakit ``PeftModel`` in ``model``'s wrappers
    (itself, or under ``torch.compile``'s, as ``state.adapter_model`` unwraps them) whose
    adapter layers are disabled (``disable_adapter_layers``); None when there is none."""
    from lorakit.peft_compat import PeftModel  # (imports lorakit.merge, which imports this)

    while True:
        if isinstance(model, PeftModel):
            if model._layers_disabled:
                return adapter_name_list(model.active_adapters)
            model = model.model
        elif type(model).__name__ == "OptimizedModule" and "_orig_mod" in model._modules:
            model = model._modules["_orig_mod"]
        else:
            return None


def _refuse_nothing(model: nn.Module, known: Sequence[str], what: str) -> None:
    """``ValueError`` unless some LoRA layer of ``model`` already holds a merge (then the result
    does fold adapters in, as PEFT's does): with no adapter active, none named and none merged,
    ``what`` would fold in nothing and ``merge_and_unload`` would return the base model."""
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        return
    raise ValueError(
        f"{what}: no adapter of this model is active (set_active(model, ()), or a PeftModel's "
        "disable_adapter_layers() on the model inside it, left none active), so it would fold "
        "in nothing and give back the base weights. Activate adapters again "
        "(enable_adapter_layers() on the PeftModel, or lorakit.set_active(model, names)) or "
        f"name those to merge: adapter_names=[...], of {list(known)}. lorakit.unload(model) "
        "gives the base model. Nothing was changed."
    )


def refuse_two_copies(model: nn.Module, adapter_names: Sequence[str] | None, what: str) -> None:
    """``ValueError`` (before any change) when two of the NAMED ``adapter_names`` hold
    ``modules_to_save`` copies of one module: ``what`` (the caller's name) could keep one
    copy there, and which would depend on the order (peft 0.22 refuses too, "Only one adapter
    can be set at a time"). The default choice (the active adapters) keeps the copy the
    forward runs, the first active one's; trainable-token rows are ``refuse_shared_rows``'."""
    if not adapter_names:
        return
    names = adapter_name_list(adapter_names)
    for path, wrapper in saved_modules(model):
        held = [n for n in names if n in wrapper.modules_to_save]
        if len(held) > 1 and not isinstance(wrapper, TrainableTokens):
            raise ValueError(
                f"{what}: adapters {held} each hold a modules_to_save copy of {path!r}, and the "
                "merged model can keep one of them. Name one of these adapters in adapter_names "
                "(the others' LoRA layers can be merged first with lorakit.merge), as peft 0.22 "
                "asks. Nothing was changed."
            )
