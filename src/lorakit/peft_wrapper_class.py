"""The class each model a ``PeftModel`` wraps gets: ``PeftModelFor<ModelClass>``
(``wrapper_class``, one per pair of classes), whose ``forward`` carries the model's signature.

transformers' ``Trainer`` keeps the dataset columns named in ``inspect.signature(model.forward)``
and takes its label names from the parameters of ``type(model).forward`` that contain
``"label"`` (``find_labels``). A wrapper whose forward is ``(*args, **kwargs)`` would make it
drop every column, so each wrapped model class gets its own subclass whose ``forward`` has the
model's signature (plus ``adapter_names``). The class name keeps the model's, so checks on the
name (``"QuestionAnswering"`` in ``find_labels``) answer as for the model. ``remade_wrapper``
rebuilds an instance for unpickling.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["remade_wrapper", "wrapper_class"]

_CLASSES: dict[tuple[type, type], type] = {}


def wrapper_class(peft_class: type, model_class: type[nn.Module]) -> type:
    """``PeftModelFor<model_class>``: a subclass of ``peft_class`` (cached per pair) whose
    ``forward`` has ``model_class.forward``'s signature with ``adapter_names`` added."""
    key = (peft_class, model_class)
    if key not in _CLASSES:
        name = f"PeftModelFor{model_class.__name__}"
        namespace = {
            "forward": _forward_for(peft_class, model_class),
            "__module__": peft_class.__module__,
            "__qualname__": name,
            "__doc__": peft_class.__doc__,
        }
        _CLASSES[key] = type(name, (peft_class,), namespace)
    return _CLASSES[key]


def remade_wrapper(peft_class: type, model_class: type[nn.Module]) -> nn.Module:
    """An empty instance of ``wrapper_class(peft_class, model_class)`` (unpickling fills it)."""
    return object.__new__(wrapper_class(peft_class, model_class))


def _forward_for(peft_class: type, model_class: type[nn.Module]):
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        return peft_class.forward(self, *args, adapter_names=adapter_names, **kwargs)

    forward.__doc__ = peft_class.forward.__doc__
    signature = _signature_with_adapter_names(model_class)
    if signature is not None:
        forward.__signature__ = signature
    return forward


def _signature_with_adapter_names(model_class: type[nn.Module]) -> inspect.Signature | None:
    """``model_class.forward``'s signature (``self`` first) with the keyword-only parameter
    ``adapter_names=None`` added before ``**kwargs``; None where it cannot be read."""
    try:
        signature = inspect.signature(model_class.forward)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())
    if "adapter_names" in signature.parameters:
        return signature
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(parameters)
    if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
        at -= 1
    return signature.replace(parameters=[*parameters[:at], extra, *parameters[at:]])
