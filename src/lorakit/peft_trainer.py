"""What transformers' ``Trainer`` needs from the front door's ``PeftModel``, not a ``peft.PeftModel``.

``PeftTrainerMixin``: ``_get_name()`` is the wrapped model's (``Trainer.compute_loss`` shifts the
labels for label smoothing only when that name is a causal-LM class's, unwrapping only real peft
models), and a model already gradient-checkpointing when wrapped gets its input embeddings'
output to require grad, as PEFT's ``PeftModel.__init__`` does (a reentrant checkpointed block
whose inputs do not require grad passes no gradient to the LoRA tensors inside it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PeftTrainerMixin"]


class PeftTrainerMixin:
    """What transformers' ``Trainer`` reads from a model, answered as for the wrapped model
    (``self.model``): its name, and inputs that carry gradients through checkpointed blocks."""

    def _get_name(self) -> str:
        """The wrapped model's name (``LlamaForCausalLM``). ``Trainer.compute_loss`` with
        ``label_smoothing_factor`` shifts the labels by one only when this name is a causal-LM
        class's (it unwraps ``peft.PeftModel`` only); ``PeftModelFor...`` would score each
        position against its own token. The wrapper's class name while it holds no model yet
        (being copied or unpickled)."""
        model = self.__dict__.get("_modules", {}).get("model")
        return type(self).__name__ if model is None else model._get_name()

    def __repr__(self) -> str:
        """``nn.Module``'s repr, headed by the wrapper's class name (``PeftModelFor...(``), not
        by ``_get_name()``, so the printed tree shows the wrapper around the model."""
        text = nn.Module.__repr__(self)
        return type(self).__name__ + text[len(self._get_name()) :]

    @staticmethod
    def _prepared_for_checkpointing(model: nn.Module) -> nn.Module:
        """``model``, its input embeddings' output made to require grad where it is already
        gradient-checkpointing (PEFT's ``PeftModel.__init__``; also a module without
        ``is_gradient_checkpointing``, as in PEFT). Why: with ``use_reentrant=True`` a
        checkpointed block whose inputs do not require grad passes no gradient to the LoRA
        tensors inside it. transformers' ``gradient_checkpointing_enable`` does this itself only
        for models whose ``main_input_name`` is ``input_ids``, so a ViT classifier would train
        its head alone. Skipped, as in PEFT, for a quantized model
        (``prepare_model_for_kbit_training`` does it); skipped also where transformers' hooks
        are there already (PEFT adds a second set, which ``disable_input_require_grads()``
        then leaves in place)."""
        if not _checkpointing(model) or _quantized(model):
            return model
        if getattr(model, "_require_grads_hooks", None):  # transformers >= 5 keeps them there
            return model
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif callable(getattr(model, "get_input_embeddings", None)):
            embeddings = model.get_input_embeddings()
            if embeddings is not None:
                embeddings.register_forward_hook(_output_requires_grad)
        return model


def _checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` is gradient-checkpointing: ``is_activation_checkpointing``
    (transformers >= 5.x), else ``is_gradient_checkpointing`` (the older name, which 5.x
    warns about), else True, as PEFT reads a module that has neither."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", True) if flag is None else flag)


def _quantized(model: nn.Module) -> bool:
    """PEFT's test for a bitsandbytes / quantized transformers model."""
    flags = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
    return any(getattr(model, flag, False) for flag in flags)


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)
