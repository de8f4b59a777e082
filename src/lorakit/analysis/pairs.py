"""A base and a fine-tuned model loaded from disk, as their layers can be compared.

Two of one class are compared whole. Otherwise (a ``BertModel`` base and the
``BertForSequenceClassification`` fine-tuned from it; a causal LM base and a sequence
classifier) their shared transformers body (``base_model``) is compared, and the result is
meant for a model of the fine-tune's class: its module names carry the body's prefix there
(``bert.encoder...``), and its head, which only the fine-tune has, is named so that it can be
saved in full. Modules missing from a checkpoint (randomly initialised at loading) are named
with the checkpoint that lacks them ("both" when neither has them), in the compared models'
names. A quantized checkpoint (a ``quantization_config``) is refused before either model loads
(``sources.refuse_quantized``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.analysis.sources import comparable, load_model_with_new, refuse_quantized

__all__ = ["ModelPair", "base_with_finetuned_head", "load_pair", "new_head_parameters"]

NEW_HEAD = "new head: not in the base; save it in full, e.g. modules_to_save"


@dataclass
class ModelPair:
    """``base`` and ``finetuned``: what is compared (the bodies when the classes differ).
    ``base_model`` / ``finetuned_model``: the whole models; ``prefix``: the name of
    ``finetuned`` inside ``finetuned_model`` ("" when it is the whole model).
    ``newly_initialised``: ``{compared module name: "base" | "fine-tuned" | "both"}``, the
    modules whose weights that checkpoint (or both) lacked."""

    base: nn.Module
    finetuned: nn.Module
    base_model: nn.Module
    finetuned_model: nn.Module
    prefix: str
    newly_initialised: dict[str, str]


def _name_in(model: nn.Module, part: nn.Module) -> str:
    """The module name of ``part`` inside ``model`` ("" for the model itself)."""
    return next(name for name, module in model.named_modules() if module is part)


def _under(names: set[str], prefix: str) -> set[str]:
    """``names`` below ``prefix`` without it (all of them when ``prefix`` is "")."""
    if not prefix:
        return set(names)
    return {name[len(prefix) + 1 :] for name in names if name.startswith(prefix + ".")}


def load_pair(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    task: str | None = None,
    progress: bool = True,
) -> ModelPair:
    """Load both models (``sources.load_model_with_new``) and reduce them to what compares; a
    quantized checkpoint is refused before either loads."""
    from lorakit.model_specs import resolve_model

    for spec in (base, finetuned):
        refuse_quantized(resolve_model(str(spec)))
    base_model, base_new = load_model_with_new(base, task, progress=progress)
    finetuned_model, finetuned_new = load_model_with_new(finetuned, task, progress=progress)
    base_part, finetuned_part = comparable(base_model, finetuned_model)
    prefix = _name_in(finetuned_model, finetuned_part)
    new = dict.fromkeys(_under(finetuned_new, prefix), "fine-tuned")
    for name in _under(base_new, _name_in(base_model, base_part)):
        new[name] = "both" if name in new else "base"
    return ModelPair(base_part, finetuned_part, base_model, finetuned_model, prefix, new)


def base_with_finetuned_head(pair: ModelPair) -> nn.Module:
    """A model of the fine-tune's class holding the base's weights where the base has them:
    the base itself when the classes agree; else the fine-tuned model whose body gets the
    base body's tensors of one name and shape (but those newly initialised in the base), so
    only the head stays the fine-tune's. Changes ``pair.finetuned_model`` in place: extract
    before calling."""
    if pair.base_model is pair.base and pair.finetuned_model is pair.finetuned:
        return pair.base_model  # (one class: nothing to rebuild)
    body = dict(pair.finetuned.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, tensor in pair.base.state_dict(keep_vars=True).items():
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            target = body.get(name)
            if pair.newly_initialised.get(module_name) in ("base", "both") or target is None:
                continue
            if target.shape == tensor.shape:
                target.copy_(tensor.to(target.dtype))
    return pair.finetuned_model


def new_head_parameters(pair: ModelPair) -> dict[str, dict]:
    """``{parameter name: {"change": None, "relative": None, "note": ...}}`` for the
    parameters of the fine-tuned model outside its compared body (a classification head):
    LoRA does not capture them; the note says to save them in full."""
    if not pair.prefix:
        return {}
    base_names = {name for name, _ in pair.base_model.named_parameters()}
    return {
        name: {
            "change": None,
            "relative": None,
            "note": NEW_HEAD
            if name not in base_names
            else "outside the shared body: not extracted; save it in full, e.g. modules_to_save",
        }
        for name, _ in pair.finetuned_model.named_parameters()
        if not name.startswith(pair.prefix + ".")
    }
