"""The checks ``lorakit.models.load_model`` makes of a model directory before and after
transformers loads it, each a ``UserError`` naming the directory and the way out: a
``config.json`` that cannot be read, custom code (``auto_map``: never run, never prompted), an
encoder asked for as a causal LM (it would attend to later tokens), a trained classifier's label
count, weights the checkpoint lacks (left random by transformers), and a converted built-in in
the cache that is damaged (``cache_hint``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.model_cache import cache_root
from lorakit.model_specs import BUILTIN_MODELS

__all__ = [
    "bidirectional_types",
    "cache_hint",
    "head_labels",
    "in_cache",
    "loading_errors",
    "read_config",
    "refuse_custom_code",
    "refuse_encoder",
    "refuse_missing_weights",
]


def in_cache(directory: Path) -> bool:
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


def cache_hint(directory: Path) -> str | None:
    """For a directory in the cache: delete it so lorakit converts it again."""
    if not in_cache(directory):
        return None
    return f"the cached model is damaged: delete {directory} and run again (it is converted anew)"


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
        hint = cache_hint(directory)
        raise UserError(
            f"cannot load the model in {directory}: {first}" + (f"; {hint}" if hint else "")
        ) from None


def refuse_missing_weights(
    directory: Path, model: torch.nn.Module, info: dict, *, new_head: bool = False
) -> None:
    """A checkpoint that lacks some of the model's weights (transformers would fill them with
    random values) is refused, naming them. A missing weight tied to a loaded one (an output
    layer sharing the input embedding) is not missing. ``new_head``: the weights outside the
    base model (a sequence classifier's ``score`` / ``classifier``, new by design) may be
    missing; the body's may not. A classifier checkpoint lacking only the LM head is named as
    one (``_refuse_classifier``)."""
    missing = set(info.get("missing_keys") or ()) - (_head_keys(model) if new_head else set())
    if not missing:
        return
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(tensor) for key, tensor in tensors.items() if key not in missing}
    absent = sorted(key for key in missing if key not in tensors or id(tensors[key]) not in loaded)
    if not absent:
        return
    shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
    _refuse_classifier(directory, model, absent, shown)
    hint = cache_hint(directory) or (
        "save the complete model there again (model.save_pretrained) or give another directory"
    )
    raise UserError(
        f"the checkpoint in {directory} lacks {len(absent)} of the model's weights ({shown}), "
        f"which would be left random; {hint}"
    )


def _refuse_classifier(
    directory: Path, model: torch.nn.Module, absent: list[str], shown: str
) -> None:
    """A sequence classifier's checkpoint (its config's ``architectures`` end in
    ``ForSequenceClassification``) loaded as a causal LM lacks only the output layer
    (``lm_head.weight``: a classifier saves a ``score`` / ``classifier`` head instead): said
    so, with the load that takes it (``task='seq-cls'``), not "save the complete model"."""
    architectures = [a for a in getattr(model.config, "architectures", None) or () if a]
    classifier = next(
        (a for a in architectures if str(a).endswith("ForSequenceClassification")), None
    )
    if classifier is None or not set(absent) <= _output_keys(model):
        return
    raise UserError(
        f"the checkpoint in {directory} is a sequence classifier ({classifier}), not a causal "
        f"language model: it has a classification head and no LM head ({shown}, which would "
        "be left random). Load it with lorakit.models.load_model(path, task='seq-cls') (the "
        "lorakit analyze and extract commands take --task seq-cls; train, eval, generate and "
        "merge run causal LMs only)"
    )


def _output_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of ``model``'s output layer (``get_output_embeddings``: e.g.
    ``lm_head.weight``, GPT-NeoX's ``embed_out.weight``); empty for a model without one."""
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if getter is not None else None
    if output is None:
        return set()
    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if module is output
        for key in module.state_dict()
    }


def _head_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of ``model`` outside its base model (``base_model_prefix``): a
    sequence classifier's head (``score.weight``, ``classifier.dense.bias``, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), torch.nn.Module):
        return set()
    return {key for key in model.state_dict() if not key.startswith(prefix + ".")}


def read_config(directory: Path) -> dict:
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
    hint = cache_hint(directory) or (
        "save the model there again with model.save_pretrained(directory), which writes config.json"
    )
    raise UserError(f"cannot load the model in {directory}: {problem}; {hint}")


def refuse_custom_code(directory: Path, config: dict) -> None:
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


def refuse_encoder(directory: Path, config: dict | None = None) -> None:
    """An encoder's directory (its config says it is not a decoder) is refused as a causal LM
    by name. transformers would load a BERT-like model (one with a masked-LM class, see
    ``bidirectional_types``) as ``*ForCausalLM`` with ``is_decoder`` false, i.e. with
    bidirectional attention (position 0's logits depend on every later token), or an encoder
    with no causal-LM class with a new, random LM head."""
    if config is None:
        try:
            config = read_config(directory)
        except UserError:
            return  # (loading_errors reports a missing or broken config)
    model_type = config.get("model_type")
    decoder = bool(config.get("is_decoder")) or (model_type == "xlm" and config.get("causal"))
    if decoder:
        return  # (e.g. RobertaForCausalLM, BertLMHeadModel saved as decoders)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    encoder = any(a.startswith(_ENCODER_ARCHITECTURES) for a in architectures)
    if encoder or model_type in bidirectional_types():
        raise UserError(
            f"the model in {directory} is an encoder ({model_type}), not a causal "
            "language model; load it with lorakit.models.load_model(path, task='seq-cls', "
            "num_labels=N) (see docs/models-and-data.md). (Its config.json has no "
            '"is_decoder": true, so it would attend to later tokens.)'
        )


def bidirectional_types() -> frozenset[str]:
    """The ``model_type`` s transformers loads as a causal LM with bidirectional attention
    unless the config says ``is_decoder``: those with a masked-LM class
    (``MODEL_FOR_MASKED_LM_MAPPING_NAMES``: bert, camembert, ernie, roberta, xlm-roberta-xl,
    ...) and BertGeneration, less the encoder-decoders (bart, mbart, mvp), whose causal-LM class
    is their decoder (it sets ``is_decoder`` itself). Real decoders (llama, gpt2, gpt_neox, ...)
    have no masked-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    encoder_decoders = {"bart", "mbart", "mvp"}
    return frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES) - encoder_decoders | {"bert-generation"}


_ENCODER_ARCHITECTURES = ("BertModel", "BertFor", "RobertaModel", "RobertaFor", "DistilBert")


def head_labels(directory: Path, config: dict, num_labels: int | None) -> int:
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
