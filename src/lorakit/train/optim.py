"""AdamW over the trainable parameters only, with LoRA+ parameter groups.

LoRA+ (Hayou et al., 2024) trains ``B`` with a larger learning rate than ``A``:
``lr_B = lr * loraplus_ratio``. A and B are found through the LoRA layers themselves
(``layer.adapter_parameters(name)`` returns ``[A, B]``), never by a substring of a parameter name.
Every other trainable parameter (biases chosen by ``bias``, ``modules_to_save`` copies) uses ``lr``.

The step uses torch's fused AdamW kernel where every parameter is a float tensor on a device that
has it (CPU, CUDA): one call updates all adapter tensors instead of about ten small ops per tensor
(56 adapter tensors of a 4-layer Llama: 0.57 ms instead of 2.25 ms a step on one CPU thread; the
same update, to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.state import lora_layers

__all__ = ["ParameterGroups", "build_optimizer", "parameter_groups"]


@dataclass
class ParameterGroups:
    """Trainable parameters split by role (each list in ``model.parameters()`` order)."""

    lora_A: list[nn.Parameter]
    lora_B: list[nn.Parameter]
    other: list[nn.Parameter]

    @property
    def all(self) -> list[nn.Parameter]:
        return [*self.lora_A, *self.lora_B, *self.other]


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """Split the parameters with ``requires_grad`` into LoRA A, LoRA B and the rest."""
    a_ids: set[int] = set()
    b_ids: set[int] = set()
    for _, layer in lora_layers(model):
        for adapter_name in layer.adapter_names:
            lora_a, lora_b = layer.adapter_parameters(adapter_name)[:2]  # (DoRA: then m)
            a_ids.add(id(lora_a))
            b_ids.add(id(lora_b))
    groups = ParameterGroups([], [], [])
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in a_ids:
            groups.lora_A.append(parameter)
        elif id(parameter) in b_ids:
            groups.lora_B.append(parameter)
        else:
            groups.other.append(parameter)
    if not groups.all:
        raise UserError(
            "the model has no trainable parameters: inject an adapter first (lorakit.inject) "
            "and make it active (lorakit.set_active)."
        )
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    loraplus_ratio: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: group 0 = A and others at ``lr``; with LoRA+ a second
    group holds B at ``lr * loraplus_ratio`` (without LoRA+, B joins group 0)."""
    groups = parameter_groups(model)
    if loraplus_ratio is None or loraplus_ratio == 1.0:
        param_groups = [{"params": groups.all, "lr": lr}]
    else:
        if loraplus_ratio <= 0:
            raise UserError(f"loraplus_ratio must be positive, got {loraplus_ratio}")
        param_groups = [
            {"params": [*groups.lora_A, *groups.other], "lr": lr},
            {"params": groups.lora_B, "lr": lr * loraplus_ratio},
        ]
    fused = fused_adamw_applies(groups.all)
    return torch.optim.AdamW(
        param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )


_FUSED_DEVICES = ("cpu", "cuda")


def fused_adamw_applies(params: list[nn.Parameter]) -> bool:
    """True when torch's fused AdamW can step all of ``params``: floating point, on CPU or CUDA
    (elsewhere the default for-loop / foreach implementation is used)."""
    return all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
