"""What a LoRA extraction leaves out (``lorakit.analysis.extract``): the linear layers whose
weight another parameter shares (``tied_linears``: a head tied to the input embedding gets no
LoRA, merging one would change the embedding too), and every other parameter the fine-tune
changed (``uncaptured_changes``: biases, norms, embeddings, heads, newly initialised modules,
parameters only one model has), with how far it moved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lorakit.analysis.one_sided import one_sided_parameters
from lorakit.analysis.updates import linear_weights, missing_from, stream_linear_updates

__all__ = ["tied_linear_changes", "tied_linears", "uncaptured_changes"]


def tied_linears(*models: nn.Module) -> dict[str, str]:
    """``{linear module name: the other parameter its weight is}`` for every linear layer of
    ``models`` whose weight tensor another parameter shares (tied weights)."""
    from lorakit.layers.linear import is_conv1d
    from lorakit.state import parameter_holders

    tied: dict[str, str] = {}
    for model in models:
        names = parameter_holders(model)
        for module_name, module in model.named_modules():
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                continue
            weight = module.weight
            path = f"{module_name}.weight" if module_name else "weight"
            shared = [n for n in names.get(id(weight), []) if n != path]
            if shared and module_name not in tied:
                tied[module_name] = shared[0]
    return tied


def tied_linear_changes(
    base: nn.Module, finetuned: nn.Module, tied: Mapping[str, str], new: Mapping[str, str]
) -> list[str]:
    """The linear layers in ``tied`` (``tied_linears``; but those in ``new``) whose weight
    differs between the two models (``extract_lora`` leaves them out; ``analyze`` reports their
    ΔW)."""
    others = {name for name, _ in linear_weights(base)} - set(tied)
    skipped = others | set(new)
    return [name for name, _ in stream_linear_updates(base, finetuned, torch.float32, skipped)]


def uncaptured_changes(
    base: nn.Module,
    finetuned: nn.Module,
    captured: set[str],
    tied: dict[str, str],
    new: Mapping[str, str],
) -> dict:
    """``{"change": ||p_ft - p0||, "relative": change / ||p0|| (None if p0 = 0)}`` of every other
    parameter the fine-tune moved (biases, norms, embeddings, heads); one of another shape (a
    new head with other labels) has change None and both shapes. The weight of a linear layer
    in ``tied`` (``{module: the parameter its weight is}``) has ``"note": "tied to <other>"``;
    the parameters of a module in ``new`` (``{module: "base" | "fine-tuned" | "both"}``, newly
    initialised at loading) have change None and a note naming the checkpoint(s) they lack; a
    parameter only one model has (``one_sided.OneSidedParameter.uncaptured_entry``) has change
    None, ``only_in`` and its shape."""
    tuned = dict(finetuned.named_parameters(remove_duplicate=False))
    changes = {}
    for name, parameter in base.named_parameters(remove_duplicate=False):
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        if name.endswith(".weight") and module_name in captured:
            continue
        other = tuned.get(name)
        if other is None:
            continue
        if module_name in new:
            note = f"{missing_from(new[module_name])} (newly initialised): not extracted"
            changes[name] = {"change": None, "relative": None, "note": note}
            continue
        if other.shape != parameter.shape:  # e.g. a new classification head: reshaped, not moved
            changes[name] = {"change": None, "relative": None, "shapes": [*parameter.shape]}
            changes[name]["finetuned_shapes"] = [*other.shape]
            continue
        if torch.equal(other, parameter):
            continue
        norm = float(parameter.detach().double().norm())
        change = float((other.detach().double() - parameter.detach().double()).norm())
        changes[name] = {"change": change, "relative": change / norm if norm > 0 else None}
        if name.endswith(".weight") and module_name in tied:
            changes[name]["note"] = f"tied to {tied[module_name]}"
    for parameter in one_sided_parameters(base, finetuned):
        changes[parameter.name] = parameter.uncaptured_entry()
    return changes
