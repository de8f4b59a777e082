"""The errors of a ``LoraConfig`` whose targets do not fit the model, with what to change:
``no_match_message`` (nothing left to adapt: what was asked, what was removed and by which field,
what exists) and ``check_every_entry_matches`` (a ``target_modules`` list entry that names no
module: PEFT drops it silently when another entry matches; lorakit refuses it, suggesting the
closest names; likewise a ``modules_to_save`` entry that picks no module). The matching rules
are ``lorakit.targets``'.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetModulesError
from lorakit.layers import is_linear
from lorakit.targets import (
    _excluded,
    _layer_index,
    _saved_module_of,
    matches,
    model_modules,
    resolved_target_spec,
    saved_module_entries,
)
from lorakit.wrapped_modules import saved_module_names

__all__ = ["check_every_entry_matches", "no_match_message"]


def _adaptable_leaf_names(model: nn.Module) -> list[str]:
    """The last name parts of the modules lorakit can adapt (for error messages), sorted."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model_modules(model)
            if name and (is_linear(module) or isinstance(module, nn.Embedding))
        }
    )


def no_match_message(model: nn.Module, config: LoraConfig) -> str:
    """An error message for a config that matched nothing: what was asked, what exists."""
    spec = resolved_target_spec(model, config)
    requested = [spec] if isinstance(spec, str) else list(spec)
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, _ in model_modules(model) if name})
    adaptable = _adaptable_leaf_names(model)
    close = sorted(
        {
            hit
            for entry in requested
            for hit in difflib.get_close_matches(
                entry.rsplit(".", 1)[-1], leaf_names, n=3, cutoff=0.5
            )
        }
    )
    removed = _why_matches_were_removed(model, config, spec)
    if removed:
        return f"target_modules={spec!r} matched modules, but {removed}; nothing is left to adapt."
    message = f"target_modules={spec!r} matched no module of this {type(model).__name__}."
    if config.layers_to_transform is not None:
        message += f" (layers_to_transform={config.layers_to_transform!r} also applies.)"
    ending = _regex_naming_an_ending(model, spec)
    if ending:
        message += ending
    elif close:
        message += f" Closest module names: {close}."
    message += f" Adaptable modules (last name part): {adaptable[:20]}."
    return message


def _regex_naming_an_ending(model: nn.Module, spec: str | list[str]) -> str:
    r"""For a string ``spec`` that equals the last dotted parts of a module name (``"q_proj"``,
    ``"self_attn.q_proj"``): a sentence saying that a string is a regex matched against the
    WHOLE name, with the two ways to say "every module ending so" (a list, or ``r".*\.q_proj"``);
    "" otherwise (the closest names are the better hint then)."""
    if not isinstance(spec, str):
        return ""
    names = [name for name, _ in model_modules(model) if name]
    example = next((name for name in names if name.endswith("." + spec)), None)
    if example is None:
        return ""
    regex = r".*\." + re.escape(spec)
    return (
        f" A string target_modules is a regex matched against the WHOLE module name (e.g. "
        f"{example!r}), as in PEFT; {spec!r} is how such names end: write "
        f"target_modules=[{spec!r}] (a list entry matches every name ending with it) or "
        f"target_modules=r'{regex}'."
    )


def _why_matches_were_removed(model: nn.Module, config: LoraConfig, spec: str | list[str]) -> str:
    """Which fields took away the modules ``spec`` matches (for a config that adapts nothing):
    ``exclude_modules``, ``modules_to_save`` (with a ``SEQ_CLS`` head), ``layers_to_transform``
    (or a ``layers_pattern`` that names no layer container, so no module has a layer index),
    each with the modules it took and what to change; "" when ``spec`` matched no module."""
    matched = [name for name, _ in model_modules(model) if name and matches(spec, name)]
    saved = saved_module_entries(config)
    excluded = [name for name in matched if _excluded(config, name)]
    inside = [n for n in matched if n not in excluded and saved and _saved_module_of(saved, n)]
    other_layers = [n for n in matched if n not in excluded and n not in inside]
    reasons = []
    if excluded:
        reasons.append(
            f"exclude_modules={config.exclude_modules!r} removed {excluded[:5]} (drop them "
            "from exclude_modules to adapt them)"
        )
    if inside:
        reasons.append(
            f"modules_to_save entries {saved} removed {inside[:5]} (they lie in modules "
            "trained in full; drop them from modules_to_save to adapt them)"
        )
    if other_layers and config.layers_to_transform is not None:
        unfound = _unfound_layers_pattern(model, config, matched, other_layers)
        reasons.append(
            unfound
            or f"layers_to_transform={config.layers_to_transform!r} removed {other_layers[:5]}"
        )
    return "; ".join(reasons)


def _layer_containers(names: list[str]) -> list[str]:
    """The name parts followed by a layer number and more parts (``transformer.h.0.attn.c_attn``
    -> ``h``; ``model.layers.0.mlp.experts.1.w1`` -> ``layers``, ``experts``): the values
    ``layers_pattern`` can take for these modules, outermost first, each once."""
    containers: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 2):
            if parts[i + 1].isdigit() and not parts[i].isdigit():
                containers.setdefault(parts[i])
    return list(containers)


def _unfound_layers_pattern(
    model: nn.Module, config: LoraConfig, matched: list[str], removed: list[str]
) -> str:
    """Why ``layers_to_transform`` removed ``removed`` when ``layers_pattern`` is the cause: no
    matched module has ``<layers_pattern>.<digits>.`` in its path, so no module gets a layer
    index (GPT-2's layers are ``transformer.h.<i>``: ``layers_pattern="layers"`` finds none).
    Names the containers that do hold the matched modules and what to change; "" when
    ``layers_pattern`` is unset or finds a layer index in some matched name (then the index
    itself is what ``layers_to_transform`` did not select)."""
    pattern = config.layers_pattern
    if not pattern or any(_layer_index(name, pattern) is not None for name in matched):
        return ""
    model_names = [name for name, _ in model_modules(model) if name]
    where = (
        "of the matched modules"
        if any(_layer_index(name, pattern) is not None for name in model_names)
        else f"of this {type(model).__name__}"
    )
    shown = pattern if isinstance(pattern, str) else "|".join(pattern)
    message = (
        f"layers_pattern={pattern!r} names no layer container {where} (no matched module has "
        f"'{shown}.<number>.' in its path), so layers_to_transform="
        f"{config.layers_to_transform!r} found no layer index and removed {removed[:5]}"
    )
    containers = _layer_containers(matched)
    if not containers:
        return message + (
            " (the matched modules' paths hold no layer number: drop layers_to_transform and "
            "layers_pattern to adapt them)"
        )
    drop = any(_layer_index(name, None) is not None for name in removed)
    return message + (
        f"; the layer containers in the matched modules' paths are {containers}: set "
        f"layers_pattern to one of them (e.g. layers_pattern={containers[0]!r})"
        + (" or drop it" if drop else "")
    )


def check_every_entry_matches(
    model: nn.Module, config: LoraConfig, modules: Mapping[str, nn.Module] | None = None
) -> None:
    """Raise ``TargetModulesError`` if an entry of a list ``config.target_modules`` matches no
    module of ``model`` (PEFT's list rule, before ``exclude_modules`` and layer selection), naming
    each such entry and the closest module names; ``ValueError`` if a ``modules_to_save`` entry
    picks no module, a task type's head excepted (``wrapped_modules.saved_module_names``, strict:
    a ``SEQ_CLS`` config lists both ``classifier`` and ``score``). PEFT drops both kinds silently;
    this is ``inject``'s ``strict_targets`` check. A regex string, "all-linear" and an unset
    ``target_modules`` are not checked entry by entry. ``modules``: ``dict(model_modules(model))``
    when the caller has it."""
    if isinstance(config.target_modules, list):
        found = model_modules(model) if modules is None else modules.items()
        names = [name for name, _ in found if name]
        unmatched = [
            entry
            for entry in config.target_modules
            if not any(matches([entry], name) for name in names)
        ]
        if unmatched:
            raise TargetModulesError(_unmatched_message(model, unmatched, names))
    if config.modules_to_save:
        saved_module_names(model, config, strict=True)


def _unmatched_message(model: nn.Module, unmatched: list[str], names: list[str]) -> str:
    hints = []
    for entry in unmatched:
        depth = entry.count(".") + 1  # compare with name endings of as many parts
        endings = sorted({".".join(name.split(".")[-depth:]) for name in names})
        close = difflib.get_close_matches(entry, endings, n=1, cutoff=0.6)
        if close:
            hints.append(f"{entry!r}: did you mean {close[0]!r}?")
    adaptable = _adaptable_leaf_names(model)
    message = (
        f"target_modules entries {unmatched} match no module of this {type(model).__name__} "
        "(every entry of a target_modules list must be the full name of a module or its last "
        "dotted parts)."
    )
    if hints:
        message += " " + " ".join(hints)
    return message + f" Adaptable modules (last name part): {adaptable[:20]}."
