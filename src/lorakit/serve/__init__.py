"""Serving many LoRA adapters on one base model: the adapter bank, the batched op, the engine.

    model = ...                                      # a transformers causal LM, base weights only
    prepare_for_serving(model, "all-linear")         # empty LoRA layers around the targets
    bank = AdapterBank(model, max_rank=16, capacity=64)
    bank.load(name, config, tensors)                 # PEFT keys, or bank.load_from_model(...)
    with routed(bank, token_slots):                  # token_slots (B, T): slot per token, -1 none
        logits = model(input_ids).logits

See docs/serving.md.
"""

from lorakit.serve.bank import (
    AdapterBank,
    AdapterInUseError,
    BankFullError,
    LayerStack,
    prepare_for_serving,
)
from lorakit.serve.batched import BankRouter, RowGroups, group_rows, routed

__all__ = [
    "AdapterBank",
    "AdapterInUseError",
    "BankFullError",
    "BankRouter",
    "LayerStack",
    "RowGroups",
    "group_rows",
    "prepare_for_serving",
    "routed",
]
