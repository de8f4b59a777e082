"""The modules an adapter trains whole or by rows, beside its LoRA layers: ``modules_to_save``
(a trained copy each, ``ModulesToSave``; the classification head for SEQ_CLS) and
``trainable_token_indices`` (some embedding rows, ``TrainableTokens``). Which modules, the checks
that keep one module to one kind, and wrapping them (``inject``; ``lorakit.io.load``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetModulesError
from lorakit.layers import ModulesToSave, TrainableTokens
from lorakit.layers.tokens import token_targets
from lorakit.state import saved_modules
from lorakit.targets import (
    absent_task_heads,
    model_modules,
    saved_module_entries,
    saved_module_matches,
)

__all__ = [
    "add_to_wrappers",
    "check_saved_not_nested",
    "check_wrapper_kind",
    "replace_module",
    "saved_module_names",
    "token_module_names",
]


def saved_module_names(model: nn.Module, config: LoraConfig, strict: bool = False) -> list[str]:
    """The modules of ``model`` whose trained copies ``config`` saves (``modules_to_save``, plus
    the classification heads for SEQ_CLS), picked by PEFT's rule (``saved_module_matches``: a
    name ending with an entry), so that files move between lorakit and peft both ways.

    A ``modules_to_save`` entry that picks no module is skipped, as PEFT skips it; with
    ``strict`` (``inject``'s ``strict_targets``, through
    ``target_errors.check_every_entry_matches``) it is a ``ValueError`` naming it, unless it
    is a head of the task type (``targets.absent_task_heads``: ``score`` on a BERT classifier,
    whose ``SEQ_CLS`` config lists ``["classifier", "score"]`` as PEFT writes it), which is
    skipped either way."""
    wanted = saved_module_entries(config)
    if not wanted:
        return []
    names = [name for name, _ in model_modules(model) if name]
    found = [name for name in names if saved_module_matches(wanted, name)]
    if strict:
        _refuse_unmatched_entries(model, config, names, found)
    return found


def _refuse_unmatched_entries(
    model: nn.Module, config: LoraConfig, names: list[str], found: list[str]
) -> None:
    """``ValueError`` naming the ``modules_to_save`` entries that pick none of ``found`` (the
    modules every entry picks), a task type's absent head (``absent_task_heads``) excepted."""
    missing = [
        entry
        for entry in config.modules_to_save or []
        if not any(saved_module_matches([entry], name) for name in found)
    ]
    heads = absent_task_heads(config, names) if missing else []
    missing = [entry for entry in missing if entry not in heads]
    if missing:
        raise ValueError(
            f"modules_to_save entries {missing} match no module of this {type(model).__name__}; "
            "check the names (e.g. print([n for n, _ in model.named_modules()])), or drop them "
            "(lorakit.inject(..., strict_targets=False) skips them, as PEFT does)."
        )


def check_wrapper_kind(module: nn.Module, name: str, for_tokens: bool) -> None:
    """ValueError when another adapter trains ``name`` the other way (token rows vs a full copy)."""
    if for_tokens and isinstance(module, ModulesToSave) and not isinstance(module, TrainableTokens):
        raise ValueError(f"module {name!r} is saved in full; it cannot also train token rows.")
    if not for_tokens and isinstance(module, TrainableTokens):
        raise ValueError(f"module {name!r} trains token rows; it cannot also be saved in full.")


def check_saved_not_nested(model: nn.Module, config: LoraConfig, saved_names: list[str]) -> None:
    """``TargetModulesError`` (one line, naming both modules, the entries that pick them and
    the way out) when ``saved_names`` (this adapter's ``modules_to_save``, task heads included)
    and the modules earlier adapters copy whole hold a module and a module inside it (RoBERTa
    ``SEQ_CLS`` with ``["dense"]``: ``classifier`` and ``classifier.dense``; ``["mlp",
    "down_proj"]``): the outer copy trains the inner module already. PEFT 0.22 wraps the inner
    module a second time, inside both the copy and the original, and writes a file it cannot
    load back. Changes nothing."""
    earlier = [n for n, m in saved_modules(model) if not isinstance(m, TrainableTokens)]
    picked = sorted({*saved_names, *earlier})
    for outer in picked:
        for inner in picked:
            if inner.startswith(outer + ".") and {outer, inner} & set(saved_names):
                raise TargetModulesError(_nested_message(config, saved_names, outer, inner))


def _nested_message(config: LoraConfig, saved_names: list[str], outer: str, inner: str) -> str:
    def picked_by(name: str) -> str:
        if name not in saved_names:
            return "an earlier adapter's modules_to_save"
        entry = next(e for e in saved_module_entries(config) if saved_module_matches([e], name))
        if entry in (config.modules_to_save or []):
            return f"entry {entry!r}"
        return f"entry {entry!r}, the head task_type={config.task_type!r} adds"

    entry = next((e for e in config.modules_to_save or [] if saved_module_matches([e], inner)), "")
    if inner not in saved_names:
        way_out = f"Drop the entry that picks {outer!r} from this adapter's modules_to_save"
    else:
        others = [n for n in saved_names if saved_module_matches([entry], n)]
        others = [n for n in others if not any(n.startswith(f"{o}.") for o in saved_names)]
        listed = ", ".join(map(repr, others[:3])) + (", ..." if len(others) > 3 else "")
        way_out = f"Drop {entry!r} from modules_to_save" + (
            f" and name the modules it should still copy in full ({listed})" if others else ""
        )
    return (
        f"modules_to_save picks {outer!r} ({picked_by(outer)}) and {inner!r} inside it "
        f"({picked_by(inner)}): the copy of {outer!r} trains {inner!r} already, and a module "
        "inside a copied module cannot be copied again (PEFT 0.22 wraps it twice and writes a "
        f"file it cannot load back). {way_out}. Nothing was changed."
    )


def token_module_names(
    model: nn.Module, config: LoraConfig, targets: Iterable[str], saved_names: Iterable[str]
) -> dict[str, list[int]]:
    """``{embedding name: token ids}`` whose rows ``config.trainable_token_indices`` trains
    (``layers.tokens.token_targets``); ValueError for an embedding that is also a LoRA target
    or in ``modules_to_save`` (as PEFT refuses the latter)."""
    found = token_targets(model, config.trainable_token_indices, dict(model_modules(model)))
    clash = sorted(set(found) & {*targets, *saved_names})
    if clash:
        raise ValueError(
            f"{clash}: trainable_token_indices names module(s) that are also in target_modules "
            "or modules_to_save; train an embedding one way only."
        )
    return found


def add_to_wrappers(
    model: nn.Module,
    adapter_name: str,
    saved_names: list[str],
    tokens: Mapping[str, list[int]],
    init: bool | str | None,
) -> None:
    """The adapter's copies of ``modules_to_save`` and its trainable token rows, each module
    wrapped (``ModulesToSave``, ``TrainableTokens``) the first time."""
    for name in saved_names:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            replace_module(model, name, wrapper)
        wrapper.add_adapter(adapter_name)  # a copy of the original: its modes included
        wrapper.training = wrapper.modules_to_save.training = wrapper.original_module.training
    for name, indices in tokens.items():
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, TrainableTokens):
            wrapper = TrainableTokens(wrapper)
            replace_module(model, name, wrapper)
        wrapper.add_tokens(adapter_name, indices, init)


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` where the submodule called ``name`` is (a LoRA layer in, or back out)."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)
