"""Which modules a ``LoraConfig`` adapts: one pure function, ``find_targets``, with PEFT's rules.

- ``target_modules`` as a string: a regex that must match the WHOLE module name.
- as a list: a name equal to an entry or ending in ``"." + entry`` (entries are not regexes).
  ``target_errors.check_every_entry_matches`` refuses a list with an entry that names no module
  (a typo that PEFT drops silently when another entry matches).
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the output embedding, for
  ``SEQ_CLS`` the ``score`` / ``classifier`` head, and the ``out_proj`` of an
  ``nn.MultiheadAttention`` (which reads its weight and bias directly and never calls it, so an
  adapter there would never run: naming it in ``target_modules`` is refused).
- ``exclude_modules``: the same rules, removing matches.
- ``layers_to_transform``: the layer index is the first ``<layers_pattern>.<digits>.`` segment of
  the name (any container name when ``layers_pattern`` is unset). A module named in full in a
  ``target_modules`` list is adapted whatever its layer (PEFT's rule); an empty list selects all.
- ``modules_to_save`` (plus the task type's heads, ``TASK_HEADS``, as PEFT adds them) picks
  every module whose name is an entry or ends with ``"." + entry`` (``saved_module_matches``,
  peft 0.22's rule; before 0.22 any plain-string ending: ``lorakit.io.older_peft_files`` reads
  such files as written); the modules it picks (and everything inside them) are never adapted,
  and are simply left out of the targets, as PEFT's ``check_target_module_exists`` leaves
  them out (``target_modules=["q_proj", "lm_head"]`` with ``modules_to_save=["lm_head"]``
  adapts the ``q_proj`` layers and trains ``lm_head`` in full).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from torch import nn

from lorakit.config import LoraConfig
from lorakit.config_layer_checks import regex_with_layers_message
from lorakit.default_targets import DEFAULT_TARGETS
from lorakit.errors import TargetModulesError
from lorakit.layers import LoraLayer, ModulesToSave, is_linear
from lorakit.state import walk_modules

__all__ = [
    "DEFAULT_TARGETS",
    "SEQ_CLS_HEADS",
    "TASK_HEADS",
    "absent_task_heads",
    "find_targets",
    "in_selected_layer",
    "left_out_as_saved",
    "matches",
    "model_modules",
    "saved_module_entries",
    "saved_module_matches",
]

SEQ_CLS_HEADS = ("classifier", "score", "pre_classifier")
TASK_HEADS = {"SEQ_CLS": SEQ_CLS_HEADS, "TOKEN_CLS": SEQ_CLS_HEADS, "QUESTION_ANS": ("qa_outputs",)}
"""The head names PEFT's task models add to ``modules_to_save`` (``PeftModelForSequence-
Classification``, ``...ForTokenClassification``, ``...ForQuestionAnswering``): a task head is
newly initialised by ``from_pretrained``, so it is trained in full and saved with the adapter.
peft 0.22 added ``pre_classifier`` (DistilBERT's randomly initialised layer before
``classifier``; under 0.21 the plain-string rule picked it through ``"classifier"``)."""


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the ORIGINAL model: a LoRA layer stands for the module it wraps and
    the insides of LoRA layers and saved-module wrappers are skipped."""
    for name, module in walk_modules(model):
        if isinstance(module, LoraLayer) and name.endswith(".base_layer"):
            continue  # a LoRA layer nested in another stands for the same module
        yield name, original_module(module)


def original_module(module: nn.Module) -> nn.Module:
    """The module a LoRA layer (nested ones included) or saved-module wrapper stands for; any
    other module itself."""
    if isinstance(module, LoraLayer):
        while isinstance(module, LoraLayer):
            module = module.base_layer
        return module
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def matches(spec: str | list[str], module_name: str) -> bool:
    """PEFT's matching: regex full match for a string; equal-or-``.entry`` suffix for a list."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(module_name == entry or module_name.endswith("." + entry) for entry in spec)


def saved_module_entries(config: LoraConfig) -> list[str]:
    """``config.modules_to_save`` plus the head names PEFT adds to it for the task type
    (``TASK_HEADS``: ``classifier``, ``score`` and ``pre_classifier`` for ``SEQ_CLS`` and
    ``TOKEN_CLS``, ``qa_outputs`` for ``QUESTION_ANS``): the entries that pick the modules an adapter copies
    whole. (PEFT adds the ``TOKEN_CLS`` / ``QUESTION_ANS`` heads after placing the LoRA layers,
    and so fails on a head it adapted, "modules_to_save cannot be applied to modules of type
    Linear", for ``all-linear``; here the heads of every task are left out of the targets, as
    ``SEQ_CLS``'s are in PEFT.)"""
    entries = list(config.modules_to_save or [])
    heads = TASK_HEADS.get(config.task_type, ())
    entries += [head for head in heads if head not in entries]
    return entries


def absent_task_heads(config: LoraConfig, module_names: Iterable[str]) -> list[str]:
    """The entries of ``config.modules_to_save`` that are a head of its task type
    (``TASK_HEADS``) and pick none of ``module_names`` (``saved_module_matches``): skipped
    with no error, as PEFT skips them. PEFT's task models write every head (``classifier``,
    ``score`` and, from 0.22, ``pre_classifier``) into a ``SEQ_CLS`` adapter's
    ``modules_to_save`` (lorakit records the same), and a model has only some of them."""
    heads = TASK_HEADS.get(config.task_type, ())
    wanted = [entry for entry in config.modules_to_save or [] if entry in heads]
    if not wanted:
        return []
    names = list(module_names)
    return [entry for entry in wanted if not any(saved_module_matches([entry], n) for n in names)]


def saved_module_matches(entries: list[str], module_name: str) -> bool:
    """PEFT's ``modules_to_save`` rule (peft 0.22, ``_is_valid_match``): the name is an entry
    or ends with ``"." + entry`` (``"classifier"`` picks ``classifier``, not
    ``pre_classifier``; ``"norm"`` picks ``model.norm``, not ``input_layernorm``). Files from
    peft hold a copy of every module this picks, so lorakit must pick the same ones to read and
    write them (a file of peft < 0.22, whose rule was any plain-string ending:
    ``lorakit.io.older_peft_files``)."""
    return any(module_name == entry or module_name.endswith("." + entry) for entry in entries)


def left_out_as_saved(entries: list[str], module_name: str) -> bool:
    r"""PEFT's guard in ``check_target_module_exists``: no LoRA on a module that an entry of
    ``modules_to_save`` (``saved_module_entries``: PEFT adds the ``SEQ_CLS`` heads to the config
    before it matches targets) names as whole dotted name parts, nor on anything inside it
    (``lm_head`` for ``"lm_head"``, ``model.layers.0.self_attn.q_proj`` for ``"self_attn"``;
    not ``pre_classifier`` for ``"classifier"``). Such a module is trained in full instead, so it
    is dropped from the targets with no error. The entry is read as PEFT reads it, a regex in
    ``(^|.*\.)<entry>($|\..*)``."""
    return any(re.match(rf"(^|.*\.){entry}($|\..*)", module_name) for entry in entries)


def _saved_module_of(saved: list[str], module_name: str) -> str | None:
    """The outermost module that ``saved`` picks (``saved_module_matches``, the rule that
    copies it whole) and that is or holds ``module_name``; None if none. No LoRA goes there
    (the copy is trained in full)."""
    parts = module_name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if saved_module_matches(saved, prefix):
            return prefix
    return None


def _layer_index(module_name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The FIRST numbered segment (``layers.3.experts.0`` -> 3), after ``layers_pattern`` if set."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", module_name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = None
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module_name)
            if found is not None:
                break
    return None if found is None else int(found.group(1))


def in_selected_layer(config: LoraConfig, module_name: str) -> bool:
    """Whether ``layers_to_transform`` keeps ``module_name`` (unset or an empty list: every
    module, as in PEFT)."""
    if config.layers_to_transform is None or config.layers_to_transform == []:
        return True
    index = _layer_index(module_name, config.layers_pattern)
    if index is None:
        return False
    wanted = config.layers_to_transform
    return index == wanted if isinstance(wanted, int) else index in wanted


def _excluded_heads(
    model: nn.Module, config: LoraConfig, modules: list[tuple[str, nn.Module]]
) -> set[str]:
    """Names "all-linear" never adapts: the output embedding, or the task's head
    (``TASK_HEADS``). Compared as the modules they stand for (``original_module``): a head
    that another adapter wraps (a LoRA layer, or a ``ModulesToSave`` copy for
    ``modules_to_save=["lm_head"]``) is still the head, and ``modules`` may hold either the
    original modules (``model_modules``) or the wrappers."""
    heads: list[nn.Module] = []
    output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    if output_embeddings is not None:
        heads.append(output_embeddings)
    else:
        task_heads = TASK_HEADS.get(config.task_type, ())
        heads.extend(getattr(model, name) for name in task_heads if hasattr(model, name))
    wrapped = {id(original_module(head)) for head in heads}
    return {name for name, module in modules if id(original_module(module)) in wrapped}


def resolved_target_spec(model: nn.Module, config: LoraConfig) -> str | list[str]:
    """``config.target_modules``, or the default for the model's architecture. A default that
    is a regex (Gemma 4's, its language model only) with ``layers_to_transform`` set is a
    ``ValueError``, as ``LoraConfig`` refuses a regex ``target_modules`` with it (PEFT would
    adapt every layer: it ignores ``layers_to_transform`` for a regex)."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS and not _converted_moe(model):
        default = DEFAULT_TARGETS[model_type]
        if isinstance(default, str) and config.layers_to_transform is not None:
            which = f"{type(model).__name__} (model type {model_type!r})"
            raise ValueError(regex_with_layers_message(config, default, default_for=which))
        return default if isinstance(default, str) else list(default)
    if config.target_parameters:
        return []  # parameters only (PEFT's rule: the default, if any, comes first)
    raise ValueError(
        f"LoraConfig.target_modules is not set and lorakit has no default for model type "
        f"{model_type!r}; pass target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'."
    )


def _converted_moe(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers-5 fused MoE model whose config PEFT converts
    (``lorakit.moe_targets``): PEFT converts before it applies its defaults, and the conversion
    turns an unset ``target_modules`` into an empty one, so such a model takes no default."""
    from lorakit.moe_targets import fused_moe_family  # (moe_targets imports this module)

    return fused_moe_family(model) is not None


def find_targets(
    model: nn.Module,
    config: LoraConfig,
    modules: Mapping[str, nn.Module] | None = None,
) -> list[str]:
    """Names of the modules ``config`` adapts, in model order (pure: the model is not changed).
    ``modules``: ``dict(model_modules(model))`` when the caller has it (saves a walk)."""
    spec = resolved_target_spec(model, config)
    saved = saved_module_entries(config)
    named = list(model_modules(model) if modules is None else modules.items())
    never_called = _uncalled_linears(named)
    if config.targets_all_linear:
        excluded = _excluded_heads(model, config, named) | set(never_called)
        candidates = [n for n, m in named if is_linear(m) and n not in excluded]
        spec = candidates
    matched = [
        n
        for n, _ in named
        if n and matches(spec, n) and not _excluded(config, n) and not left_out_as_saved(saved, n)
    ]
    targets = [
        name
        for name in matched
        if not (saved and _saved_module_of(saved, name))
        and (_named_in_full(config, name) or in_selected_layer(config, name))
    ]
    _refuse_uncalled(targets, never_called)
    return targets


def _excluded(config: LoraConfig, module_name: str) -> bool:
    """Whether ``exclude_modules`` names ``module_name`` (same rules as ``target_modules``)."""
    return config.exclude_modules is not None and matches(config.exclude_modules, module_name)


def _uncalled_linears(modules: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """``{name: its parent's name}`` of the linear layers their parent never calls: the
    ``out_proj`` of each ``nn.MultiheadAttention``, whose forward reads ``out_proj.weight`` and
    ``out_proj.bias`` itself (a LoRA layer there would never run, and it hides the bias)."""
    return {
        f"{name}.out_proj" if name else "out_proj": name
        for name, module in modules
        if isinstance(module, nn.MultiheadAttention)
    }


def _refuse_uncalled(targets: list[str], never_called: Mapping[str, str]) -> None:
    """``TargetModulesError`` naming the first of ``targets`` that its parent never calls."""
    for name in targets:
        if name in never_called:
            raise TargetModulesError(
                f"module {name!r} is the out_proj of the nn.MultiheadAttention "
                f"{never_called[name] or '(the model itself)'!r}, which reads out_proj.weight "
                "and out_proj.bias directly and never calls the module: a LoRA adapter there "
                "would never run. Remove it from target_modules or add it to exclude_modules "
                '("all-linear" leaves it out).'
            )


def _named_in_full(config: LoraConfig, module_name: str) -> bool:
    """Whether a ``target_modules`` list holds ``module_name`` itself: PEFT then adapts it
    without applying ``layers_to_transform`` (the user named that very module)."""
    return isinstance(config.target_modules, list) and module_name in config.target_modules
