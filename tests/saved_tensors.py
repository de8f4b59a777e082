"""What a real CPU training forward saves for backward, in bytes: the reference the planner's
meta-device count (``lorakit.activations``) is checked against, written independently of it."""

from __future__ import annotations

import torch


def saved_bytes(model: torch.nn.Module, **inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward of ``model`` on ``inputs``,
    each storage once, parameters and buffers left out. With ``labels`` the loss is checked to
    be part of the graph (its saved tensors are then counted too)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    held: dict[int, torch.UntypedStorage] = {}  # (held: no address is reused meanwhile)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            held[storage.data_ptr()] = storage
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**inputs)
    if "labels" in inputs:
        assert output.loss.requires_grad
    return sum(storage.nbytes() for storage in held.values())
