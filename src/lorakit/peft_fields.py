"""Every field of PEFT's ``LoraConfig`` (peft 0.22.0; ``astra_config`` is new in 0.22) and what
lorakit does with it, in one place.

Each field is one of:

- ``SUPPORTED``: lorakit reads, computes and writes it with PEFT's meaning and numbers;
- ``REFUSED``: it changes what is trained, computed or saved in a way lorakit does not
  implement, so an ``adapter_config.json`` that sets it (to anything but its "off" value) is
  refused (``lorakit.io.config_json``) and lorakit's ``LoraConfig`` has no such field;
- ``IGNORED``: it has no effect on the numbers or on the files (bookkeeping, or settings that
  only matter together with a refused value of another field), so it is read and dropped.

``tests/test_peft_fields.py`` walks ``dataclasses.fields(peft.LoraConfig)``: a field PEFT adds
that is not listed here fails the suite instead of being silently dropped. docs/adapter-files.md
("Every PEFT LoraConfig field") shows this table with the reasons.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

__all__ = [
    "IGNORED",
    "PEFT_LORA_FIELDS",
    "REFUSED",
    "SUPPORTED",
    "FieldSupport",
    "file_refusal",
    "first_refused_setting",
    "is_off",
    "refusal",
    "refused_fields",
    "without_peft_only_fields",
]

SUPPORTED = "supported"
REFUSED = "refused"
IGNORED = "ignored"


class FieldSupport(NamedTuple):
    """``status``: SUPPORTED, REFUSED or IGNORED; ``why``: where it lives, or the reason."""

    status: str
    why: str


def _supported(
    why: str = "a lorakit LoraConfig field of the same name and meaning",
) -> FieldSupport:
    return FieldSupport(SUPPORTED, why)


def _refused(why: str) -> FieldSupport:
    return FieldSupport(REFUSED, why)


def _ignored(why: str) -> FieldSupport:
    return FieldSupport(IGNORED, why)


_INIT = "the settings of that initialisation (init_lora_weights; see Initialisations below)"

PEFT_LORA_FIELDS: dict[str, FieldSupport] = {
    # bookkeeping PEFT writes into every adapter_config.json
    "task_type": _supported(),
    "peft_type": _supported('must be "LORA" (other PEFT methods are refused when read)'),
    "auto_mapping": _ignored(
        "on reading; written as PEFT writes it (the model's class and module when task_type "
        "is unset, which AutoPeftModel needs); no numbers"
    ),
    "peft_version": _ignored("which PEFT wrote the file; informational"),
    "base_model_name_or_path": _supported(),
    "revision": _ignored("the hub revision of the base; lorakit checks the base by fingerprint"),
    "inference_mode": _ignored(
        "whether PEFT freezes the adapter on load; lorakit's load option (is_trainable) decides. "
        "LoraConfig(inference_mode=True) freezes the new adapter after injection, as PEFT does"
    ),
    # what is adapted and how
    "r": _supported(),
    "target_modules": _supported(),
    "exclude_modules": _supported(),
    "lora_alpha": _supported(),
    "lora_dropout": _supported(),
    "fan_in_fan_out": _supported(),
    "bias": _supported(),
    "use_rslora": _supported(),
    "modules_to_save": _supported(),
    "init_lora_weights": _supported(
        'True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_K", "olora", "loftq", '
        '"eva" (see Initialisations below)'
    ),
    "layers_to_transform": _supported(),
    "layers_pattern": _supported(),
    "rank_pattern": _supported(),
    "alpha_pattern": _supported(),
    "use_dora": _supported(),
    "lora_bias": _supported(
        "a trainable bias on lora_B (nn.Linear / Conv1D layers): h += s (B A x + b); merge adds "
        "s b to the base bias"
    ),
    "loftq_config": _supported(_INIT),
    "eva_config": _supported(_INIT),
    # PEFT features lorakit does not implement
    "trainable_token_indices": _supported(
        "chosen rows of an nn.Embedding trained in full, saved as "
        "<embedding>.token_adapter.trainable_tokens_delta; tied embeddings are refused"
    ),
    "target_parameters": _supported(
        "LoRA on bare 2-D / 3-D nn.Parameters (the fused expert weights of transformers MoE "
        "layers): A (E r, k), B (d, E r), the weight replaced by W0 + delta during the owning "
        "module's forward; not with dropout, DoRA, lora_bias or fan_in_fan_out (PEFT's rules)"
    ),
    "layer_replication": _supported(
        "decoder layers stacked from [start, end) ranges as copies sharing the base weights, "
        "each copy adapted on its own (lorakit.replication); unload restores the layer list"
    ),
    "alora_invocation_tokens": _refused(
        "activated LoRA: the adapter applies only after the invocation tokens; not implemented"
    ),
    "use_qalora": _refused("QA-LoRA pools the input in groups before A; not implemented"),
    "velora_config": _refused(
        "VeLoRA changes the backward pass and saves extra buffers; not implemented"
    ),
    "monteclora_config": _refused("MonteCLoRA samples the factors (variational); not implemented"),
    "kasa_config": _refused(
        "KaSA truncates the base by SVD and trains a diagonal (lora_diag); not implemented"
    ),
    "use_bdlora": _refused("block-diagonal LoRA factors; not implemented"),
    "arrow_config": _refused("Arrow routing between several adapters; not implemented"),
    # settings that only act together with something refused (or are runtime-only)
    "qalora_group_size": _ignored("used only with use_qalora=True, which is refused"),
    "corda_config": _ignored(
        'used only with init_lora_weights="corda", which changes the base and is refused'
    ),
    "astra_config": _ignored(
        'used only with init_lora_weights="astra" (peft 0.22), which changes the base and is '
        "refused"
    ),
    "lora_ga_config": _ignored(
        'used only with init_lora_weights="lora_ga", which changes the base and is refused '
        "unconverted"
    ),
    "megatron_config": _ignored(
        "builds Megatron tensor-parallel LoRA layers (same maths and keys); lorakit adapts "
        "torch modules only"
    ),
    "megatron_core": _ignored("the module name used with megatron_config"),
    "runtime_config": _ignored("runtime-only (e.g. GPU offload of DoRA); never written to files"),
    "ensure_weight_tying": _refused(
        "ties the adapters of tied input/output embeddings (modules_to_save, trainable "
        "tokens, target_modules) into one; not implemented"
    ),
}


def refused_fields() -> tuple[str, ...]:
    """The PEFT fields lorakit refuses when they are set (see ``REFUSED``), sorted."""
    return tuple(sorted(k for k, v in PEFT_LORA_FIELDS.items() if v.status == REFUSED))


# The values with which a REFUSED field is "off": set to one of them, it changes nothing.
_OFF_VALUES = (None, False, {}, [])
# REFUSED fields that hold a feature's settings: PEFT turns a dict, {} included, into its
# settings class (the feature on, with its defaults; use_bdlora={} then raises), so {} is on.
_SETTINGS_FIELDS = frozenset(
    {"arrow_config", "kasa_config", "monteclora_config", "use_bdlora", "velora_config"}
)


def is_off(name: str, value: object) -> bool:
    """Whether ``value`` is the "off" value of the PEFT field ``name``: None, False, {} or [],
    but only None or False for a field of feature settings (``_SETTINGS_FIELDS``)."""
    if name in _SETTINGS_FIELDS:
        return value is None or value is False
    return value in _OFF_VALUES


def first_refused_setting(values: Mapping[str, Any]) -> str | None:
    """The first field (by name) of ``REFUSED`` that ``values`` sets to something other than
    its "off" value (``is_off``): a PEFT feature lorakit does not implement; None if none."""
    return next((name for name in refused_fields() if not is_off(name, values.get(name))), None)


def refusal(name: str, value: object) -> str:
    """Why ``name=value`` (a REFUSED field set in a config built in code) is refused, for an
    error message."""
    return (
        f"{name}={value!r} is a PEFT feature lorakit does not implement "
        f"({PEFT_LORA_FIELDS[name].why}); leave it unset"
    )


def file_refusal(source: str, name: str, value: object) -> str:
    """The error message for an ``adapter_config.json`` (``source``) that sets the REFUSED
    field ``name`` to ``value``: one sentence, the feature, and the way out (PEFT)."""
    return (
        f"{source} sets {name}={value!r}, a PEFT feature lorakit cannot load without changing "
        f"the adapter's outputs ({PEFT_LORA_FIELDS[name].why}); load this adapter with PEFT "
        "(peft.PeftModel.from_pretrained) instead."
    )


def without_peft_only_fields(values: Mapping[str, Any], own: Collection[str]) -> dict[str, Any]:
    """``values`` (keyword arguments of ``LoraConfig``) without the PEFT fields that are not
    among ``own`` (lorakit's field names): IGNORED ones are dropped, REFUSED ones dropped when
    off and a ``ValueError`` naming the field otherwise, ``peft_type`` dropped when it is
    "LORA". Names PEFT does not have are kept (the dataclass refuses them)."""
    refused = first_refused_setting({k: v for k, v in values.items() if k not in own})
    if refused is not None:
        raise ValueError(f"LoraConfig.{refusal(refused, values[refused])}.")
    if values.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"LoraConfig.peft_type={values['peft_type']!r} is invalid: lorakit's LoraConfig is "
            'LoRA\'s ("LORA"); other PEFT methods are not implemented.'
        )
    return {k: v for k, v in values.items() if k in own or k not in PEFT_LORA_FIELDS}
