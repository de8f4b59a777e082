"""Why an adapter (or a part of one) cannot be combined: the ``UserError`` /
``AdapterFileError`` that ``combining.sources`` raises, each naming the adapter, the tensor or
the setting and what to do instead. Only plain LoRA factors combine (``s B A``, 2-D): not DoRA,
bare parameters (``target_parameters``), replicated layers, trained embedding rows, a bias on B,
trained biases, modules saved in full, or a convolution's 4-D factors."""

from __future__ import annotations

from typing import NoReturn

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, UserError

__all__ = [
    "refuse_convolution",
    "refuse_other_layouts",
    "refuse_other_tensor",
    "refuse_unknown_entry",
]


def refuse_other_tensor(label: str, key: str) -> NoReturn:
    """``UserError`` for a tensor of an adapter file that is neither a LoRA factor nor a base
    weight: trained rows, a bias on B, a trained bias or a module saved in full."""
    from lorakit.io.keys import is_token_rows_key

    if is_token_rows_key(key):
        raise UserError(
            f"trainable_token_indices cannot be combined: adapter {label} holds {key}, embedding "
            "rows trained to new values (not a low-rank update that sums with others). Combine "
            "adapters trained without trainable_token_indices."
        )
    if key.endswith("lora_B.bias"):
        raise UserError(
            f"adapter {label} holds {key}, a bias on lora_B (lora_bias=True), which "
            "combining cannot carry; merge that adapter into the model instead "
            "(lorakit merge)."
        )
    raise UserError(
        f"adapter {label} holds {key}, which is not a LoRA factor (a trained bias or a "
        "module saved in full); only LoRA factors can be combined. Combine adapters "
        "trained with bias='none' and no modules_to_save."
    )


def refuse_convolution(label: str, module: str, pair: dict[str, torch.Tensor]) -> None:
    """``UserError`` when a factor of ``module`` is not a 2-D matrix: PEFT's LoRA on a
    convolution (``nn.Conv2d``: A (r, C, kh, kw), B (d, r, 1, 1); ``nn.Conv1d`` / ``Conv3d``
    alike), whose update is a kernel, not the (d, k) matrix ``s B A`` every method works on.
    (transformers' ``Conv1D``, GPT-2's, has 2-D factors and combines like a linear layer.)"""
    if all(factor.dim() == 2 for factor in pair.values()):
        return
    described = ", ".join(f"{role} {list(pair[role].shape)}" for role in sorted(pair))
    raise UserError(
        f"adapter {label}: module {module} has LoRA factors that are not 2-D matrices "
        f"({described}): a LoRA on a convolution layer (e.g. nn.Conv2d). lorakit combines "
        "LoRA on linear / Conv1D / embedding layers only; combine this adapter with peft's "
        "add_weighted_adapter, which handles convolution layers."
    )


def refuse_other_layouts(label: str, config: LoraConfig) -> None:
    if config.use_dora:
        raise UserError(
            f"{label} is a DoRA adapter (use_dora=True): its magnitude vector rescales each "
            "output row, so its update is not B A and has no low-rank sum with others; combine "
            "plain LoRA adapters (merge a DoRA adapter into the weights instead: lorakit merge)"
        )
    if config.target_parameters:
        raise UserError(
            f"{label} adapts bare parameters (target_parameters={config.target_parameters!r}), "
            "whose factors hold one block per expert; lorakit combines LoRA pairs of modules "
            "only."
        )
    if config.layer_replication:
        raise UserError(
            f"{label} adapts replicated layers (layer_replication={config.layer_replication!r});"
            " lorakit combines adapters of the plain layers only."
        )


def refuse_unknown_entry(entry: str, on_model: dict[str, LoraConfig]) -> NoReturn:
    """``AdapterFileError`` for an entry that names neither an adapter on the model nor an
    existing path (a misspelled adapter name, most often): both readings are said, with the
    model's adapter names."""
    from lorakit.errors import listed

    names = listed([repr(name) for name in on_model], 20) if on_model else "none"
    raise AdapterFileError(
        f"{entry!r} is neither an adapter on the model (its adapters: {names}) nor an existing "
        "adapter directory; give one of the model's adapter names or a directory's path."
    )
