"""Refuse loading a DoRA file whose row norms would be 0 on this base (``load_checks``).

DoRA scales output row i by ``f_i = m_i / n_i`` with ``n_i = ||W0_i + s (B A)_i||``
(``lorakit.functional``). Where the base weight's row is all zero (pruned, zero-padded),
``n_i = |s| ||B_i A||``, which is 0 when the file's ``B A`` is zero on that row too (an
adapter saved untrained on that base: ``B = 0``, ``m_i = 0``): ``f_i = 0 / 0`` and every output
through the layer is NaN (as in PEFT). ``check_dora_rows`` refuses such a file before the model
changes: one pass over each targeted base weight (``dora_norms.zero_rows``); only where a zero
row is found is the file's data read, to look at ``B A`` on those rows.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import functional
from lorakit.dora_norms import rows_named, zero_rows
from lorakit.errors import AdapterFileError
from lorakit.io.load_plan import LoadTargets
from lorakit.io.read import read_adapter_data
from lorakit.layers import LoraLayer
from lorakit.layers.linear import is_conv1d
from lorakit.targets import original_module

__all__ = ["check_dora_rows"]


def check_dora_rows(to_load: LoadTargets, current: dict[str, nn.Module]) -> None:
    """``AdapterFileError`` naming the layer, its zero rows and the way out when a DoRA file's
    ``n_i = ||W0_i + s (B A)_i||`` is 0 on some row of a target (``current``: the model's
    modules, LoRA layers included, by name)."""
    config, header = to_load.config, to_load.header
    if not config.use_dora or header is None or to_load.expert_conversion is not None:
        return
    candidates = {}
    for name in to_load.targets:
        weight, fan_in_fan_out = _base_weight(current[name])
        if weight is not None:
            rows = zero_rows(weight, fan_in_fan_out)
            if rows.numel():
                candidates[name] = rows.cpu()
    if not candidates:
        return
    tensors = read_adapter_data(header).tensors  # (rare: a base with all-zero rows)
    for name, rows in candidates.items():
        factors = _file_factors(to_load, tensors, name)
        if factors is None:
            continue  # (missing or misshapen: ``check_tensors`` names it)
        scale = functional.scaling(config.rank_for(name), config.alpha_for(name), config.use_rslora)
        lora_A, lora_B = (factor.to(torch.float64) for factor in factors)
        update = scale * (lora_B[rows] @ lora_A)  # (len(rows), k): s (B A) on the zero rows
        zero = rows[~update.any(dim=1)].tolist()
        if zero:
            raise AdapterFileError(_message(to_load.source, name, zero, lora_B.shape[0]))


def _base_weight(module: nn.Module) -> tuple[torch.Tensor | None, bool]:
    """``(W0, fan_in_fan_out)`` of a DoRA target (a LoRA layer's original weight, or the
    nn.Linear / Conv1D's own); ``(None, False)`` where there are no float values to read."""
    if isinstance(module, LoraLayer):
        weight, fan_in_fan_out = module.original_weight, getattr(module, "fan_in_fan_out", False)
    else:
        module = original_module(module)
        weight, fan_in_fan_out = getattr(module, "weight", None), is_conv1d(module)
    if not isinstance(weight, torch.Tensor) or weight.is_meta or not weight.is_floating_point():
        return None, False
    return weight, fan_in_fan_out


def _file_factors(
    to_load: LoadTargets, tensors: dict[str, torch.Tensor], name: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The file's ``(A (r, k), B (d, r))`` for target ``name``; None unless both are there,
    2-D and of matching rank."""
    keys = {e.role: e.key for e in to_load.tensors if e.module == name and not e.parameter}
    found = [tensors.get(keys.get(role, "")) for role in ("lora_A", "lora_B")]
    if any(factor is None or factor.dim() != 2 for factor in found):
        return None
    lora_A, lora_B = found
    return (lora_A, lora_B) if lora_A.shape[0] == lora_B.shape[1] else None


def _message(source: object, name: str, rows: list[int], out_features: int) -> str:
    return (
        f"adapter {source} is a DoRA adapter, and on {name!r} its row norms "
        f"n = ||W0 + s B A||_row would be 0 on {len(rows)} of the {out_features} output rows "
        f"({rows_named(rows)}): this model's weight is all zero there (a pruned or zero-padded "
        "row) and so is the file's s B A (an adapter saved untrained on such a base), so "
        "f = m / n is undefined and every output through the layer would be NaN (PEFT computes "
        "NaN there). Nothing was changed. Load it onto the base it was trained on; to train "
        f"DoRA on this base, leave {name!r} out of target_modules or use plain LoRA "
        "(use_dora=False) for it."
    )
