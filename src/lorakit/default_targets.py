"""``target_modules`` used when a config leaves it unset, by transformers ``model_type``.

PEFT's choices for every model type it covers (its
``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, peft 0.21), plus ``LORAKIT_ONLY``: model
types PEFT has no default for, where lorakit adapts the attention's fused projection (PEFT asks
for ``target_modules`` there). A model type in neither needs ``target_modules``. Fused-MoE
models take no default (``targets.resolved_target_spec``), as in PEFT.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TARGETS", "LORAKIT_ONLY", "PEFT_DEFAULTS"]

_QV = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]
_FUSED_QKV = ["query_key_value"]
PEFT_DEFAULTS: dict[str, str | list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": _QV,
    "gpt2": ["c_attn"],
    "bloom": _FUSED_QKV,
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": _QV,
    "gptj": _QV,
    "gpt_neox": _FUSED_QKV,
    "gpt_neo": _QV,
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": _QUERY_VALUE,
    "llama": _QV,
    "llama4": _QV,
    "chatglm": _FUSED_QKV,
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": _FUSED_QKV,
    "RefinedWeb": _FUSED_QKV,
    "falcon": _FUSED_QKV,
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # a regex: its language model only
    "qwen2": _QV,
    "qwen3": _QV,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

LORAKIT_ONLY: dict[str, list[str]] = {"phi3": ["qkv_proj"]}

DEFAULT_TARGETS: dict[str, str | list[str]] = {**PEFT_DEFAULTS, **LORAKIT_ONLY}
