"""What the installed peft (the tests' oracle) does differently by version.

The tests compare lorakit against whichever peft the set-up installed (``peft>=0.13``); where a
peft release fixed one of its own defects that a test measures, the test asks here which
behaviour to expect, so that it checks the oracle's real numbers on either side of the fix.
"""

from __future__ import annotations

import peft
from packaging.version import Version

__all__ = [
    "peft_at_least",
    "peft_converts_moe_targets_by_path",
    "peft_inits_conv1d_as_linear",
    "peft_loftq_device_expression",
    "peft_lora_config_fields_added_after_installed",
    "peft_saved_names_end_at_a_dot",
    "peft_scales_rslora_combinations",
    "peft_task_heads",
    "peft_token_keys_end_at_a_dot",
    "peft_unload_keeps_the_saved_copy",
    "peft_unwrappable_regex_target_message",
]


def peft_at_least(version: str) -> bool:
    """Whether the installed peft is ``version`` or later."""
    return Version(peft.__version__) >= Version(version)


def peft_scales_rslora_combinations() -> bool:
    """Before 0.22, ``add_weighted_adapter`` copied the first adapter's ``use_rslora`` into the
    new adapter while setting ``lora_alpha = r``: every result was √r too large (r: the new
    rank). peft 0.22 writes ``use_rslora=False``."""
    return not peft_at_least("0.22")


def peft_lora_config_fields_added_after_installed() -> frozenset[str]:
    """The ``LoraConfig`` fields of lorakit's table (``lorakit.peft_fields``) that the installed
    peft does not have yet: ``astra_config`` came with peft 0.22 (Astra init)."""
    return frozenset() if peft_at_least("0.22") else frozenset({"astra_config"})


def peft_token_keys_end_at_a_dot() -> bool:
    """From 0.22 a ``trainable_token_indices`` dict key names a module whose full name it is or
    ends after a dot (lorakit's rule); before, any ending of the name ("tokens" named
    ``embed_tokens``, "embed_tokens" also ``type_embed_tokens``)."""
    return peft_at_least("0.22")


def peft_loftq_device_expression() -> str:
    """The source expression by which peft's ``loftq_init`` picks the device it computes on.
    Before 0.22 it was ``"xpu" if is_xpu_available() else "cuda"`` (no CPU: it failed on a
    machine without an accelerator); peft 0.22 calls ``infer_device()`` (the accelerator if any,
    else the CPU)."""
    if peft_at_least("0.22"):
        return "infer_device()"
    return '"xpu" if is_xpu_available() else "cuda"'


def peft_unwrappable_regex_target_message(holds_converted_parameters: bool) -> str:
    """What peft's ``ValueError`` says for a regex ``target_modules`` that selects a module no
    LoRA layer wraps (OLMoE's ``".*mlp.*"``: the MoE block). Before 0.22 it injected as it went
    and failed on that module: "Target module ... is not supported". peft 0.22 checks every
    target before changing the model and, when the module holds a parameter that the MoE
    conversion also targets (``holds_converted_parameters``: the fused experts
    ``gate_up_proj`` / ``down_proj``, the router's ``gate.weight``), fails first on that:
    "Trying to wrap an `nn.Parameter` of layer ... which is not a valid target". Both refuse
    the config."""
    if holds_converted_parameters and peft_at_least("0.22"):
        return "is not a valid target"
    return "is not supported"


def peft_converts_moe_targets_by_path() -> bool:
    """From 0.22 peft's MoE target conversion (transformers 5, ``lorakit.moe_entries``)
    converts Qwen2-MoE itself too; an entry naming a transformers-4 expert / router module whose
    every matched module is an ``nn.Linear`` (Qwen2-MoE's ``shared_expert.gate_proj``,
    DeepSeek-V3's dense and shared MLPs) stays a module target, adding the fused parameter only
    where a bare parameter has that name; a moved entry keeps its path (``mlp.experts.w1`` ->
    ``mlp.experts.gate_up_proj``). Before, every such entry moved to ``target_parameters`` under
    the bare new name, and Qwen2-MoE was not converted. lorakit follows 0.22 (and 0.21's rule
    for a file whose ``peft_version`` is below 0.22)."""
    return peft_at_least("0.22")


def peft_saved_names_end_at_a_dot() -> bool:
    """From 0.22 a ``modules_to_save`` entry picks a module whose name is the entry or ends
    with ``"." + entry`` (``_is_valid_match``, lorakit's rule); before, any plain-string ending
    of the name (``"norm"`` also every ``input_layernorm``, ``"classifier"`` DistilBERT's
    ``pre_classifier``, and ``"proj"`` a ``q_proj`` LoRA layer: "modules_to_save cannot be
    applied to modules of type ... lora.Linear")."""
    return peft_at_least("0.22")


def peft_task_heads(task_type: str) -> list[str]:
    """The heads peft's task models add to ``modules_to_save``: 0.22 added ``pre_classifier``
    (DistilBERT's newly initialised layer before ``classifier``) for ``SEQ_CLS`` and
    ``TOKEN_CLS``."""
    if task_type == "QUESTION_ANS":
        return ["qa_outputs"]
    return ["classifier", "score"] + (["pre_classifier"] if peft_at_least("0.22") else [])


def peft_unload_keeps_the_saved_copy() -> bool:
    """Before 0.22 ``PeftModel.unload()`` put the active adapter's trained ``modules_to_save``
    copy in place of the module; peft 0.22 gives the original module back (only
    ``merge_and_unload()`` keeps the copy)."""
    return not peft_at_least("0.22")


def peft_inits_conv1d_as_linear() -> bool:
    """From 0.22 peft's OLoRA and LoftQ on a transformers ``Conv1D`` work on ``W0`` (out, in),
    as lorakit does, and peft reloads their unconverted files onto the original base exactly.
    Before, they ran on the stored (in, out) weight: A and B of the wrong shapes, its own
    forward failing on them ("mat1 and mat2 shapes cannot be multiplied")."""
    return peft_at_least("0.22")
