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
    "peft_loftq_device_expression",
    "peft_lora_config_fields_added_after_installed",
    "peft_scales_rslora_combinations",
    "peft_token_keys_end_at_a_dot",
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
