"""``target_modules`` as PEFT writes it into ``adapter_config.json`` (``io.config_json``).

A regex stays as given; ``"all-linear"`` (and an unset ``target_modules``) is expanded to the
module names PEFT resolves it to; a list of 20 or more names is condensed to the shortest
suffixes that tell the targets from every other module, as PEFT condenses it. The result is
sorted and free of repeats.
"""

from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig
from lorakit.state import saved_modules
from lorakit.targets import _excluded_heads, find_targets, model_modules, resolved_target_spec

__all__ = ["written_target_modules"]

# PEFT's limit above which it writes the shortest distinguishing suffixes instead of names.
_MIN_TARGETS_FOR_SUFFIXES = 20


def written_target_modules(model: nn.Module, config: LoraConfig) -> str | list[str]:
    """``target_modules`` as PEFT writes it: a regex unchanged; "all-linear" or unset resolved
    to names; lists of 20 or more names condensed to the shortest distinguishing suffixes."""
    spec = resolved_target_spec(model, config)
    if config.targets_all_linear:
        spec = _all_linear_names(model, config)
    if isinstance(spec, str):
        return spec
    if len(spec) >= _MIN_TARGETS_FOR_SUFFIXES:
        spec = _shortest_suffixes(model, spec)
    return sorted(set(spec))


def _all_linear_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The names "all-linear" stands for, as PEFT resolves it on the model before any wrapping:
    every linear layer but the head it leaves out (the output embedding, or a ``SEQ_CLS``
    head), with no other field applied (``exclude_modules``, ``modules_to_save``: PEFT's list
    keeps a saved ``q_proj``). On the adapted model, a head saved in full (``modules_to_save``;
    a ``SEQ_CLS`` head always) is a saved-module wrapper, which ``find_targets`` reads as the
    linear layer it stands for but no longer knows as the head (the model returns the
    wrapper): such heads are left out here by the wrapper's identity."""
    plain = LoraConfig(target_modules=config.target_modules, task_type=config.task_type)
    saved_heads = _excluded_heads(model, plain, list(saved_modules(model)))
    return [name for name in find_targets(model, plain) if name not in saved_heads]


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))][::-1]  # shortest first


def _shortest_suffixes(model: nn.Module, targets: list[str]) -> list[str]:
    """PEFT's condensation: for each target (in order of its suffix list), keep its shortest
    suffix that is not a suffix of any non-target module, unless a kept suffix covers it."""
    ends = tuple("." + t for t in targets)
    others = [n for n, _ in model_modules(model) if n not in targets and not n.endswith(ends)]
    other_suffixes = {suffix for name in others for suffix in _suffixes(name)}
    required: list[str] = []
    for name, suffixes in sorted(((t, _suffixes(t)) for t in set(targets)), key=lambda x: x[1]):
        for suffix in suffixes:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(name.endswith("." + kept) for kept in required):
                required.append(suffix)
                break
    return required if 0 < len(required) < len(set(targets)) else list(targets)
