"""A transformers-4 MoE adapter file whose dense or shared-expert linear layers no target takes
on a fused (transformers-5) model, refused with what happened and how to load them
(``refuse_moved_modules``). PEFT's conversion of the file's config
(``lorakit.moe_targets.convert_moe_config``, PEFT 0.21's rule) moves the transformers-4 expert
names (``gate_proj`` / ``up_proj`` / ``down_proj`` of a DeepSeek-V3-style model) to the expert
parameters (``target_parameters``), so the layers of those names outside the experts are no
longer targets, and PEFT 0.21 loads the file without their tensors, silently. The message names
the ``target_parameters`` entries (bare parameters: the same keys, the same update) or the
``peft_version`` that would load them."""

from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, listed
from lorakit.io.keys import module_path
from lorakit.io.read import AdapterHeader
from lorakit.layers import is_linear
from lorakit.moe_entries import file_peft_version
from lorakit.moe_targets import fused_moe_family, transformers4_names

__all__ = ["refuse_moved_modules"]


def refuse_moved_modules(
    adapter: AdapterHeader, config: LoraConfig, unexpected: list[str], modules: dict[str, nn.Module]
) -> None:
    """``AdapterFileError`` when keys no target takes (``unexpected``) hold LoRA tensors of
    linear layers of this model whose names PEFT's conversion (``config``, converted from the
    file's ``adapter.config``) moved to expert parameters: the shared experts' and dense MLPs'
    ``gate_proj`` / ``up_proj`` / ``down_proj`` of a DeepSeek-V3-style model, in a file saved
    with transformers 4. Says so, and how to load them (each weight as a bare parameter: same
    keys, same update), rather than blame the architecture. ``modules[""]``: the model."""
    family = fused_moe_family(modules.get(""))
    if family is None:
        return
    renamed = transformers4_names(family)
    moved: dict[str, str] = {}  # module path -> its transformers-4 name
    for key in unexpected:
        path = module_path(key).split(".lora_")[0]
        old = path.rpartition(".")[2]
        if (
            old in renamed
            and renamed[old] in (config.target_parameters or [])
            and _asked_for(adapter.config, old)
            and path in modules
            and is_linear(modules[path])
        ):
            moved[path] = old
    if moved:
        others = [key for key in unexpected if module_path(key).split(".lora_")[0] not in moved]
        raise AdapterFileError(_moved_message(adapter, moved, others, renamed, modules))


def _asked_for(original: LoraConfig, old: str) -> bool:
    """Whether the file's own ``target_modules`` asked for modules named ``old``: a string
    (all-linear, a regex: resolved to leaf names) or a list entry naming it."""
    targets = original.target_modules
    if isinstance(targets, str):
        return True
    return any(entry == old or entry.endswith(f".{old}") for entry in targets or [])


def _moved_message(adapter, moved: dict[str, str], others, renamed, modules) -> str:
    """What happened to the modules ``moved`` (``{path: transformers-4 name}``) and the
    ``target_parameters`` entries that load them: ``<name>.weight`` where the file covers
    every linear layer of that name, else each layer's full ``<path>.weight``."""
    entries = []
    for old in sorted(set(moved.values())):
        paths = sorted(path for path, name in moved.items() if name == old)
        every = [n for n, m in modules.items() if n.endswith(f".{old}") and is_linear(m)]
        entries += [f"{old}.weight"] if set(paths) == set(every) else [f"{p}.weight" for p in paths]
    olds = sorted(set(moved.values()))
    news = sorted({renamed[old] for old in olds})
    message = (
        f"adapter {adapter.directory} has LoRA tensors for {listed(moved, 4)}, linear layers of "
        f"this {type(modules['']).__name__} that its config no longer adapts here: on this "
        "fused-MoE model (transformers 5), PEFT's conversion of the config "
        f"(lorakit.moe_targets.convert_moe_config, by the rule of PEFT 0.21, which wrote it: "
        f"{file_peft_version(adapter.config_text)}) moves the transformers-4 expert names {olds} "
        f"to the expert parameters {news} (target_parameters), so layers of those names outside "
        "the experts (dense MLPs, shared experts) are no target. The file was saved with "
        "transformers 4, where they were; PEFT 0.21 loads it without them, silently. To load "
        f"them as trained, add {entries} to target_parameters in its adapter_config.json (bare "
        'parameters: the same keys and update; PEFT 0.21 loads it so), or set its "peft_version" '
        'to "0.22.0": PEFT 0.22\'s rule, which keeps those layers as targets (PEFT 0.22 too).'
    )
    if others:
        message += (
            f" The file also has tensors that fit no module of this model: {listed(others, 4)}."
        )
    return message
