"""Models built from a spec on PyTorch's ``meta`` device: shapes and parameter counts, no memory.

A spec is a built-in config name (``BUILTIN_CONFIGS``: the numbers of the published config.json
that decide the parameter count), a lorakit built-in model, a transformers model directory, or a
config.json file. Used by ``lorakit plan`` and by ``lorakit train`` to check target modules
before any weight is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import UserError, first_line

__all__ = ["BUILTIN_CONFIGS", "build_meta_model"]

_LLAMA_DEFAULTS = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf config.json (the numbers that decide the parameter count).
    "llama-2-7b": {
        **_LLAMA_DEFAULTS,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json (its bfloat16 is not what lorakit loads:
    # build_meta_model plans a lorakit built-in model in load_model's dtype, float32).
    "smollm2-135m-instruct": {
        **_LLAMA_DEFAULTS,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
}


def build_meta_model(spec: str, dtype: str | None = None) -> tuple[nn.Module, str]:
    """The model named by ``spec`` on the meta device (no memory), and its dtype's name.

    The dtype is ``dtype`` when given, else the one ``lorakit.models.load_model`` gives a lorakit
    built-in model (float32), else the config's ``dtype`` (``torch_dtype`` in older configs;
    float32 if none).

    The class is the config's first ``architectures`` entry (e.g. ``LlamaForCausalLM``,
    ``BertModel``) when that is a model class of the config's family; otherwise (none, an Auto
    class, another family's class) the causal-LM class of its ``model_type``, else the bare
    model.
    """
    import transformers

    values = _config_values(spec)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise UserError(f"model spec {spec!r}: its config has no 'model_type'; cannot build it.")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise UserError(
            f"model spec {spec!r}: unknown model_type {model_type!r} (not a transformers "
            f"{transformers.__version__} model type such as 'llama', 'gpt2', 'bert')"
        )
    config_key = "torch_dtype" if values.get("torch_dtype") else "dtype"
    config_dtype = values.pop("torch_dtype", None) or values.pop("dtype", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except _CONFIG_ERRORS as error:
        raise UserError(f"model spec {spec!r}: invalid config: {_first_line(error)}") from None
    loaded_dtype = _loaded_dtype(spec)
    from_config = not (dtype or loaded_dtype) and config_dtype is not None
    dtype_name = _dtype_name(
        dtype or loaded_dtype or config_dtype or "float32", config_key if from_config else None
    )
    model_class = _architecture_class(values.get("architectures"), config)
    try:
        with torch.device("meta"):
            if model_class is not None:
                model = model_class(config)
            else:
                try:
                    model = transformers.AutoModelForCausalLM.from_config(config)
                except ValueError:  # no causal-LM class for this type (e.g. an encoder)
                    model = transformers.AutoModel.from_config(config)
    except _CONFIG_ERRORS as error:  # e.g. a negative size: the config's values, not lorakit
        raise UserError(
            f"model spec {spec!r}: cannot build {getattr(model_class, '__name__', model_type)} "
            f"from its config: {_first_line(error)}"
        ) from None
    return model.to(getattr(torch, dtype_name)), dtype_name


def _loaded_dtype(spec: str) -> str | None:
    """The dtype ``lorakit.models.load_model`` gives a lorakit built-in model (its ``dtype``
    default, float32; not the published config's ``torch_dtype``: SmolLM2's says bfloat16), so
    that a plan of ``smollm2-135m-instruct`` is that of the model ``lorakit train`` loads; None
    for any other spec (its config's dtype stands)."""
    import inspect

    from lorakit.models import BUILTIN_MODELS, load_model

    if spec.lower() not in BUILTIN_MODELS:
        return None
    return str(inspect.signature(load_model).parameters["dtype"].default).removeprefix("torch.")


def _architecture_class(architectures: Any, config: Any) -> type | None:
    """The transformers class named by the first ``architectures`` entry, when that is a model
    class (``PreTrainedModel``) of ``config``'s own family; else None and the Auto classes pick
    one (for an Auto class, another family's class, a name transformers lacks, a non-string)."""
    import transformers

    names = architectures if isinstance(architectures, list) else [architectures]
    name = names[0] if names and isinstance(names[0], str) else ""
    model_class = getattr(transformers, name, None) if name else None
    if not (
        isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    ):
        return None
    config_class = getattr(model_class, "config_class", None)
    if not (isinstance(config_class, type) and isinstance(config, config_class)):
        return None
    return model_class


def _strict_dataclass_error() -> type[Exception]:
    try:  # transformers >= 5 validates configs with huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return ValueError
    return StrictDataclassError


# What building a config or a model from bad config values raises (transformers' own checks,
# or torch refusing a size such as a negative dimension).
_CONFIG_ERRORS = (ValueError, TypeError, ArithmeticError, RuntimeError, _strict_dataclass_error())


def _first_line(error: BaseException) -> str:
    """The gist of an error: its cause's message when it wraps one, first line only."""
    return first_line(error.__cause__ or error, 300)


def _config_values(spec: str) -> dict[str, Any]:
    """The config.json contents for ``spec``: a built-in config, a lorakit built-in model that
    ships as a directory (``minilm-l6``), a model directory, or a config file."""
    from lorakit.models import BUILTIN_MODELS, resolve_model

    if spec.lower() in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[spec.lower()])
    path = Path(spec)
    if spec in BUILTIN_MODELS and not BUILTIN_MODELS[spec].is_gguf:
        path = resolve_model(spec)  # a directory inside an installed package: no conversion
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(
            [*BUILTIN_CONFIGS, *(n for n in BUILTIN_MODELS if n not in BUILTIN_CONFIGS)]
        )
        raise UserError(
            f"unknown model spec {spec!r}: not a built-in name ({names}), not a transformers "
            "model directory with a config.json, and not a config file."
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSON syntax, or bytes that are not UTF-8
        raise UserError(f"cannot read the model config {str(path)!r}: {error}") from None
    if not isinstance(values, dict):
        raise UserError(
            f"model config {str(path)!r} holds a JSON {type(values).__name__}, not an object of "
            'settings such as {"model_type": "llama", "hidden_size": 4096, ...}'
        )
    return values


def _dtype_name(dtype: Any, config_key: str | None = None) -> str:
    """The torch dtype name of ``dtype`` (float32, float16, bfloat16, float64 or an alias);
    ``UserError`` otherwise, naming the model config's key when the value came from there
    (``config_key``: "dtype", as transformers 5 writes it, or the older "torch_dtype") and that
    a dtype given (``lorakit plan`` / ``serve --dtype``) overrides it."""
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(name, name)
    if name not in ("float32", "float16", "bfloat16", "float64"):
        subject = f"the model config's dtype ({config_key})" if config_key else "dtype"
        way_out = ", or give a dtype (--dtype) to override it" if config_key else ""
        raise UserError(
            f"{subject} {dtype!r} is not supported: use float32, float16, bfloat16 or "
            f"float64 (or fp32, fp16, half, bf16){way_out}."
        )
    return name
