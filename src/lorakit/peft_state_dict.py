"""``PeftModel.state_dict`` / ``load_state_dict`` that list a tied tensor once.

Why: transformers' ``Trainer`` saves a model that is neither a ``PreTrainedModel`` nor a
``peft.PeftModel`` (lorakit's front door is neither) with
``safetensors.torch.save_file(model.state_dict())``, and safetensors refuses tensors that share
memory. A base that ties its input embedding and ``lm_head`` (SmolLM2, Llama-3.2, Qwen2.5) has
one tensor under two keys (``model.model.embed_tokens.weight`` and ``model.lm_head.weight``), so
every checkpoint save crashed and left an empty ``checkpoint-N/``. transformers' own
``save_pretrained`` writes a tied weight once; so does this ``state_dict``, under the name
``named_parameters()`` keeps (the first one reached), and ``load_state_dict`` fills the dropped
name from its twin (in ``_load_from_state_dict``, which torch calls for every module loaded,
so also under a parent: DDP, ``torch.compile``), so a checkpoint loads back (strict or not;
``resume_from_checkpoint``, ``load_best_model_at_end``) and the tie survives (both names still
hold one parameter).
A dict holding both names (an older full ``torch.save(model.state_dict())``) loads unchanged.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from torch import nn

__all__ = ["PeftStateDictMixin", "fill_aliases", "tied_aliases"]


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: first_name}`` for every parameter or buffer of ``module`` reachable under
    several names (a tied ``lm_head.weight`` -> ``embed_tokens.weight``, a module shared by two
    parents); ``first_name`` is the one ``named_parameters()`` / ``named_buffers()`` keep."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    )
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def fill_aliases(state_dict: dict[str, Any], aliases: dict[str, str], prefix: str = "") -> None:
    """Add to ``state_dict`` (in place) each tied name under ``prefix`` it lacks, from a twin it
    holds (either way round)."""
    groups: dict[str, list[str]] = {}
    for alias, name in aliases.items():
        groups.setdefault(name, [name]).append(alias)
    for names in groups.values():
        keys = [prefix + name for name in names]
        present = next((key for key in keys if key in state_dict), None)
        if present is not None:
            for key in keys:
                state_dict.setdefault(key, state_dict[present])


class PeftStateDictMixin:
    """``state_dict`` without tied aliases, loading that accepts their absence (see the module
    docstring: transformers' ``Trainer`` checkpoints through safetensors)."""

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """``nn.Module.state_dict`` listing each tensor once, under its first name (also when
        a parent module's ``state_dict`` reaches this one, under its prefix)."""
        state = super().state_dict(  # type: ignore[misc]
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )
        prefix = args[1] if len(args) > 1 and not prefix else prefix  # (deprecated positional)
        for alias, name in tied_aliases(self).items():  # type: ignore[arg-type]
            if prefix + name in state:
                state.pop(prefix + alias, None)
        return state

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Fill the tied names ``state_dict`` lacks before ``nn.Module`` loads this module and
        its children from it: torch's ``load_state_dict`` calls this for every module of the
        tree (a parent's load too: DDP, ``torch.compile``, a value-head wrapper), each child
        then taking its keys from the dict filled here, so ``strict=True`` takes this model's
        ``state_dict()`` under any parent."""
        fill_aliases(state_dict, tied_aliases(self), prefix)  # type: ignore[arg-type]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
