"""Adapter files written under peft's name rules before 0.22, read as their writer meant them.

Before peft 0.22 a ``modules_to_save`` entry and a ``trainable_token_indices`` dict key picked
every module whose name ENDS with it as a plain string (``"norm"``: Llama's ``model.norm`` and
every ``input_layernorm`` / ``post_attention_layernorm``; ``"classifier"``: DistilBERT's
``pre_classifier`` too; the key ``"tokens"``: ``model.embed_tokens``). From 0.22 (and in
lorakit, ``targets.saved_module_matches``, ``layers.token_checks.keyed_targets``) it picks a
module whose name is the entry or ends with ``"." + entry``. Such a file holds a tensor for
every module the old rule picked; read with the new rule it would load only some of them.

``with_writers_rules`` rewrites each entry or key the two rules read differently on this model
into the full names the old rule picked: a full name ``f`` picks, under the new rule, ``f``
and the names ending with ``"." + f``, all of which end with the entry, so the rewritten
config picks exactly what the writer's peft picked. It applies when the file's
``peft_version`` (peft writes it since 0.18) is below 0.22; when the file has none (lorakit,
peft < 0.18) or a development version of 0.22, when the file holds a tensor of a module only
the old rule picks. ``portable_entries`` writes such an entry as full names, which peft
reads alike before and after 0.22.

``read_as_written`` is the one step every reader of a file's config takes (``load_adapter``
through ``with_writers_rules`` and ``load_plan``; serving, combining, GGUF export, reloading):
the entries and keys rewritten as above, on a model's modules or, with no model, on the module
paths the file's keys name; and, given a model, the MoE targets converted by the writer's rule
(``lorakit.moe_entries``), so that a reader that cannot serve bare parameters refuses a file
that adapts them on that model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lorakit.config import LoraConfig
from lorakit.io.keys import key_names_module, module_path, parse_lora_key
from lorakit.moe_entries import PEFT_022, file_peft_version
from lorakit.targets import saved_module_entries, saved_module_matches

if TYPE_CHECKING:  # (io.read reads configs with io.config_json, which imports this module)
    from torch import nn

    from lorakit.io.read import AdapterHeader

__all__ = [
    "DOTTED_RULE_SINCE",
    "portable_entries",
    "read_as_written",
    "with_writers_rules",
    "written_with_plain_endings",
]

DOTTED_RULE_SINCE = PEFT_022
"""The peft release whose rule is ``"." + entry`` (earlier: any plain-string ending)."""


def written_with_plain_endings(config_text: str) -> bool | None:
    """Whether ``adapter_config.json`` text is from a peft before ``DOTTED_RULE_SINCE`` (its
    ``peft_version``, e.g. ``"0.21.2"`` or ``"0.22.0.dev0@<hash>"``); None when the file does
    not say (no version, or a development version of 0.22 itself)."""
    version = file_peft_version(config_text)
    found = re.match(r"(\d+)\.(\d+)(\.\d+)?(.*)", version) if version is not None else None
    if found is None:
        return None
    release = (int(found.group(1)), int(found.group(2)))
    if release == DOTTED_RULE_SINCE and found.group(4).partition("@")[0]:
        return None  # (0.22.0.dev0, 0.22.0rc1: before or after the change)
    return release < DOTTED_RULE_SINCE


def with_writers_rules(header: AdapterHeader, modules: Iterable[str]) -> AdapterHeader:
    """``header`` with its config's ``modules_to_save`` entries and ``trainable_token_indices``
    keys rewritten into the full names the writer's rule picked on a model of ``modules``
    (module names), where that rule was peft's before 0.22 (module docstring); else
    ``header`` itself."""
    old = written_with_plain_endings(header.config_text)
    config = header.config
    if old is False or not (
        config.modules_to_save or isinstance(config.trainable_token_indices, dict)
    ):
        return header
    names = [name for name in modules if name]
    newly_picked = {n for n in names if saved_module_matches(saved_module_entries(config), n)}
    saved = _saved_entries(config.modules_to_save or [], names, newly_picked, header, old)
    tokens = config.trainable_token_indices
    if isinstance(tokens, dict):
        tokens = _token_keys(tokens, names, header, old)
    if saved == (config.modules_to_save or []) and tokens == config.trainable_token_indices:
        return header
    changed = config.replace(
        modules_to_save=saved or config.modules_to_save, trainable_token_indices=tokens
    )
    return dataclasses.replace(header, config=changed)


def read_as_written(header: AdapterHeader, model: nn.Module | None = None) -> AdapterHeader:
    """``header`` as its writer's peft meant it (module docstring): ``with_writers_rules`` on the
    ORIGINAL modules of ``model`` (LoRA layers stand for what they wrap) or, where ``model`` is
    None, on the module paths the file's keys name (``file_module_names``); with a ``model``,
    its config's MoE targets also converted by the writer's rule (``moe_targets.
    convert_moe_config``, ``written_by`` from ``moe_entries.writers_version``; a config of no
    fused-MoE model is left as it is). For the readers that do not go through
    ``load_adapter`` (which takes the same two steps)."""
    from lorakit.moe_entries import writers_version
    from lorakit.moe_targets import convert_moe_config
    from lorakit.targets import model_modules

    if model is None:
        return with_writers_rules(header, file_module_names(header.tensors))
    header = with_writers_rules(header, (name for name, _ in model_modules(model)))
    written_by = writers_version(header, model)
    config = convert_moe_config(model, header.config, warn=False, written_by=written_by)
    return header if config is header.config else dataclasses.replace(header, config=config)


def file_module_names(keys: Iterable[str]) -> list[str]:
    """The module paths a file's tensor ``keys`` name, with every module enclosing them
    (``base_model.model.model.layers.0.input_layernorm.weight``: ``model``, ``model.layers``,
    ..., ``model.layers.0.input_layernorm``): the names a file's entries are read on when
    there is no model. A LoRA factor names its layer, trained rows their embedding."""
    names: dict[str, None] = {}
    for key in keys:
        parsed = parse_lora_key(key)
        path = parsed[0] if parsed else module_path(key).rpartition(".")[0]
        path = path.removesuffix(".base_layer").removesuffix(".token_adapter")
        parts = path.split(".") if path else []
        names |= {".".join(parts[:end]): None for end in range(1, len(parts) + 1)}
    return list(names)


def _old_rule_picks(entry: str, names: list[str]) -> list[str]:
    """The names peft before 0.22 picked for ``entry``: those ending with it as a string."""
    return [name for name in names if name.endswith(entry)]


def _writer_meant_old_rule(only_old: list[str], header: AdapterHeader, old: bool | None) -> bool:
    """Whether to read with the old rule an entry whose old picks add ``only_old``: the file
    says it is from peft < 0.22 (``old``), or does not say and holds a tensor of one of them."""
    if not only_old:
        return False
    if old is not None:
        return old
    return any(key_names_module(key, name) for key in header.tensors for name in only_old)


def _saved_entries(
    entries: list[str],
    names: list[str],
    newly_picked: set[str],
    header: AdapterHeader,
    old: bool | None,
) -> list[str]:
    """``modules_to_save`` entries, each the old rule reads otherwise replaced by the full
    names it picks (``newly_picked``: what the new rule picks with every entry and task head;
    a module only the old rule picks is the evidence)."""
    rewritten: list[str] = []
    for entry in entries:
        picks = _old_rule_picks(entry, names)
        only_old = [name for name in picks if name not in newly_picked]
        chosen = picks if _writer_meant_old_rule(only_old, header, old) else [entry]
        rewritten += [name for name in chosen if name not in rewritten]
    return rewritten


def _token_keys(
    indices: Mapping[str, list[int]], names: list[str], header: AdapterHeader, old: bool | None
) -> dict[str, list[int]]:
    """``trainable_token_indices`` with each key the old rule reads otherwise replaced by the
    full names it picks, each with the key's token ids."""
    rewritten: dict[str, list[int]] = {}
    for key, ids in indices.items():
        picks = _old_rule_picks(key, names)
        only_old = [name for name in picks if not saved_module_matches([key], name)]
        chosen = picks if _writer_meant_old_rule(only_old, header, old) else [key]
        rewritten |= {name: list(ids) for name in chosen}
    return rewritten


def portable_entries(config: LoraConfig, names: Iterable[str]) -> tuple[list[str] | None, Any]:
    """``(modules_to_save, trainable_token_indices)`` as lorakit writes them for a model of
    module ``names``: an entry or key that peft before 0.22 would read as more modules
    (``"norm"``: every ``*_layernorm`` too, a file peft 0.21 fails to load with a
    ``KeyError``) is written as the full names it picks, which both rules read alike; the
    others as given (``modules_to_save`` with the task type's heads:
    ``saved_module_entries``)."""
    names = [name for name in names if name]
    entries = saved_module_entries(config)
    picked = {n for n in names if saved_module_matches(entries, n)}
    saved: list[str] = []
    for entry in entries:
        portable = set(_old_rule_picks(entry, names)) <= picked
        chosen = [entry] if portable else [n for n in names if saved_module_matches([entry], n)]
        saved += [name for name in chosen if name not in saved]
    tokens = config.trainable_token_indices
    if isinstance(tokens, dict):
        tokens = {
            name: list(ids)
            for key, ids in tokens.items()
            for name in _portable_token_key(key, names)
        }
    return saved or None, tokens


def _portable_token_key(key: str, names: list[str]) -> list[str]:
    picked = [n for n in names if saved_module_matches([key], n)]
    return [key] if set(_old_rule_picks(key, names)) <= set(picked) else picked
