"""Where PEFT's MoE target conversion (``lorakit.moe_targets``) puts one ``target_modules``
entry naming a transformers-4 expert or router module, by PEFT release, and which release's
rule applies to a config.

Two rules exist (PEFT 0.21 and 0.22, with transformers >= 5). For an entry ``entry`` ending in
the transformers-4 name ``old``, which transformers 5 renamed ``new`` (``w1`` ->
``gate_up_proj``, ``gate`` -> ``gate.weight``):

- 0.21: the entry leaves ``target_modules`` and ``new`` (the bare new name, whatever path the
  entry had) joins ``target_parameters``. Qwen2-MoE itself (``model_type == "qwen2_moe"``) is
  not converted at all (0.21 looks the type up in transformers' table, where it is only a
  target).
- 0.22 (PEFT #3711, #3945): the parameter entry is ``entry`` with ``old`` replaced by ``new``
  (``mlp.experts.w1`` -> ``mlp.experts.gate_up_proj``). When every module the entry matches
  (PEFT's ``check_target_module_exists``: ``exclude_modules``, ``modules_to_save`` and
  ``layers_to_transform`` honoured) is an ``nn.Linear`` (a shared expert's or dense MLP's
  ``down_proj`` on DeepSeek-V3, Qwen2-MoE's ``shared_expert.gate_proj``), the entry stays a
  module target, and adds the parameter only where a parameter held directly by a module
  other than an ``nn.Linear`` (the fused experts beside them) is, or ends in, that name.
  Qwen2-MoE is converted like its family.

A config read from a file takes the rule of the PEFT that wrote it (``adapter_config.json``'s
``peft_version``): 0.21's below 0.22, so that a file loads onto the tensors its writer meant
(a Qwen2-MoE file of PEFT 0.21 adapts the shared experts' ``gate_proj`` only, which 0.22's
rule would read as also asking for the routed experts). Any other config (a file without the
field, e.g. lorakit's own, and every config lorakit converts at ``inject``) takes 0.22's; a
Qwen2-MoE file without the field and without any routed-expert tensor (lorakit's own, from
before it followed PEFT 0.22) takes 0.21's (``writers_version``).
"""

from __future__ import annotations

import json
import re

from torch import nn

from lorakit.config import LoraConfig
from lorakit.targets import in_selected_layer, matches, model_modules

__all__ = [
    "PEFT_022",
    "file_peft_version",
    "moved_entry",
    "rule_release",
    "writers_version",
]

PEFT_022 = (0, 22)
"""The release whose conversion rule lorakit follows for every config not read from an older
PEFT's file."""


def rule_release(written_by: str | None) -> tuple[int, int]:
    """``(major, minor)`` of the rule for a config written by PEFT ``written_by`` (its
    ``peft_version``): ``(0, 21)`` for any release below 0.22, else ``PEFT_022`` (also for None
    or a version that does not parse)."""
    found = re.match(r"\s*(\d+)\.(\d+)", written_by or "")
    if found is None:
        return PEFT_022
    release = (int(found[1]), int(found[2]))
    return (0, 21) if release < PEFT_022 else PEFT_022


def file_peft_version(config_text: str) -> str | None:
    """``peft_version`` of an ``adapter_config.json`` text (None when absent or unreadable)."""
    try:
        version = json.loads(config_text or "{}").get("peft_version")
    except (ValueError, AttributeError, RecursionError):
        return None
    return version if isinstance(version, str) else None


def moved_entry(
    model: nn.Module, config: LoraConfig, entry: str, old: str, new: str, release: tuple
) -> tuple[bool, str | None]:
    """Where the ``target_modules`` entry ``entry`` (ending in the transformers-4 name ``old``,
    now ``new``) goes under the rule of ``release`` (see the module docstring): ``(it stays a
    module target, the ``target_parameters`` entry it adds or None)``."""
    if release < PEFT_022:
        return False, new
    parameter = new.join(entry.split(old))  # (PEFT: every occurrence of old)
    hits = [module for name, module in model_modules(model) if _selects(config, entry, name)]
    if not hits or not all(isinstance(module, nn.Linear) for module in hits):
        return False, parameter
    bare = _bare_parameter_names(model)
    return True, parameter if any(matches([parameter], name) for name in bare) else None


def _selects(config: LoraConfig, entry: str, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for ``target_modules=[entry]`` and module
    ``name``, with ``config``'s exclusions and layer selection."""
    if not name or not matches([entry], name):
        return False
    if config.exclude_modules is not None and matches(config.exclude_modules, name):
        return False
    saved = config.modules_to_save or []
    if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved):
        return False
    return name == entry or in_selected_layer(config, name)  # (a full name: every layer)


def _bare_parameter_names(model: nn.Module) -> list[str]:
    """The full names of the parameters held directly by modules other than ``nn.Linear`` of
    the original model (the fused experts, a router's ``gate.weight``): those only
    ``target_parameters`` can adapt."""
    return [
        f"{owner}.{name}" if owner else name
        for owner, module in model_modules(model)
        if not isinstance(module, nn.Linear)
        for name, _ in module.named_parameters(recurse=False)
    ]


def writers_version(adapter, model: nn.Module | None) -> str | None:
    """The PEFT version whose conversion rule reads ``adapter`` (an ``AdapterHeader``) onto
    ``model``: its ``peft_version``; where it has none (lorakit's own files, PEFT < 0.18),
    "0.21" when ``model``'s type only PEFT 0.22 converts (Qwen2-MoE) and the file holds no
    tensor of the routed experts (``.experts.`` in no key): written under 0.21's rule, which
    left them out, while 0.22's rule would ask for them (a file 0.22's rule wrote has them
    wherever its targets reach them); else None (0.22's rule)."""
    from lorakit.moe_targets import fused_moe_family  # (it imports this module)

    version = file_peft_version(adapter.config_text)
    if version is not None or fused_moe_family(model) is None:
        return version
    if fused_moe_family(model, (0, 21)) is None and not any(
        ".experts." in k for k in adapter.tensors
    ):
        return "0.21"
    return None
