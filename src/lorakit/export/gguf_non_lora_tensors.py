"""Why a tensor of an adapter file that is not a LoRA factor cannot go into a llama.cpp LoRA
adapter (``export.gguf_adapter_checks``, ``--drop-unsupported``): a ``modules_to_save`` copy,
trained token rows (``trainable_token_indices``), a bias on ``lora_B`` or a trained bias, a
resized or changed embedding; or why it adds nothing and is left out: PEFT's saved copy of the
frozen embedding (equal to the model's, after rounding both to the coarser dtype).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["why_not_lora"]


def why_not_lora(key: str, tensor: torch.Tensor, config, model: nn.Module) -> str | None:
    """Why a tensor that is not a LoRA factor (``keys.py`` lists what a file holds) cannot go
    into a llama.cpp adapter, or None for one that adds nothing to the model (PEFT's copy of a
    frozen embedding, ``_embedding_copy_problem``)."""
    from lorakit.io.keys import embedding_module_names, module_path
    from lorakit.targets import matches

    module = module_path(key).rsplit(".", 1)[0].removesuffix(".base_layer")
    if config.modules_to_save and matches(config.modules_to_save, module):
        return (
            "a full trained copy of a module (modules_to_save); llama.cpp adapters hold LoRA "
            "pairs only"
        )
    if key.endswith(".trainable_tokens_delta"):
        return (
            "trained rows of the token embedding (trainable_token_indices); llama.cpp adapters "
            "hold LoRA pairs only"
        )
    if key.endswith(".lora_B.bias"):
        return "a bias on lora_B (lora_bias=True); llama.cpp adapters hold LoRA pairs only"
    if key.endswith(".bias"):
        return "a trained bias (bias='all'/'lora_only'); llama.cpp adapters hold LoRA pairs only"
    if module in embedding_module_names(model):
        return _embedding_copy_problem(tensor, model.get_submodule(module).weight)
    return "a tensor that is not a LoRA factor"


def _embedding_copy_problem(saved: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when ``saved`` (an input/output embedding's weight in the adapter file) is the
    model's own ``weight``: PEFT saves the frozen base embedding of an adapter that targets
    ``embed_tokens`` / ``lm_head`` (``save_embedding_layers="auto"``), and the base GGUF holds
    it already. Its values are compared with the model's; a model built on the meta device (the
    CLI's: shapes only) cannot tell that copy from a trained embedding, so it is a reason too
    (with ``--drop-unsupported`` it is listed as dropped); a resized or changed embedding is."""
    if tuple(saved.shape) != tuple(weight.shape):
        return (
            f"a full embedding weight of shape {list(saved.shape)} for the model's "
            f"{list(weight.shape)} (a resized vocabulary); a llama.cpp adapter cannot change it"
        )
    if weight.is_meta:
        return (
            "a full embedding weight, which the command line cannot compare with the base's (it "
            "reads the base's shapes only): if it is PEFT's saved copy of the frozen embedding "
            "(save_embedding_layers), nothing is lost by --drop-unsupported; to have it checked, "
            "export from Python with the loaded base (lorakit.export.export_adapter); a llama.cpp "
            "adapter cannot change an embedding"
        )
    if _same_values(saved, weight.detach()):
        return None
    return (
        "a full embedding weight that differs from the model's (trained or changed, not a "
        "frozen copy, or the model is not the adapter's base); a llama.cpp adapter cannot "
        "change it"
    )


def _same_values(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal after rounding both to the less precise of their two dtypes (a bfloat16 adapter
    file saved from the model that is here in float32)."""
    dtypes = (saved.dtype, weight.dtype)
    dtype = (
        max(dtypes, key=lambda d: torch.finfo(d).eps)
        if all(d.is_floating_point for d in dtypes)
        else saved.dtype
    )
    return torch.equal(saved.to(dtype), weight.to(device=saved.device, dtype=dtype))
