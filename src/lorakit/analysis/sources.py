"""Where updates come from on disk: an adapter directory, or a base and a fine-tuned model directory.

Models load offline (a local directory or a ``lorakit.models`` built-in name); the task (causal
LM or sequence classification) is read from ``config.json``'s ``architectures`` unless given, and
any other architecture loads with ``transformers.AutoModel``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.analysis.one_sided import OneSidedParameter, one_sided_parameters, one_sided_summary
from lorakit.analysis.spectrum import Spectrum, tensor_spectra
from lorakit.analysis.updates import (
    NewLayer,
    ReshapedLayer,
    linear_weights,
    reshaped_layers,
    update_spectra,
)
from lorakit.errors import UserError

__all__ = [
    "adapter_dir_spectra",
    "comparable",
    "detect_task",
    "load_model_dir",
    "load_model_with_new",
    "model_dirs_spectra",
    "model_dirs_update",
    "refuse_incomparable",
    "refuse_quantized",
]


def _read_config(directory: str | os.PathLike[str]) -> dict:
    """``config.json`` of a model directory as a dict (``UserError`` when it is missing or not
    a JSON object)."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory} is not a transformers model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{config_path} cannot be read as JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} holds a {type(config).__name__}, not a JSON object")
    return config


def detect_task(directory: str | os.PathLike[str]) -> str | None:
    """``"seq-cls"``, ``"causal-lm"`` or None (another architecture) from ``config.json``."""
    architectures = _read_config(directory).get("architectures") or [""]
    name = architectures[0]
    if name.endswith("ForSequenceClassification"):
        return "seq-cls"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    return None


def _quantization_name(settings) -> str:
    """A ``quantization_config``'s method in words: "bitsandbytes 4-bit (nf4)", "bitsandbytes
    8-bit (LLM.int8)", else its ``quant_method`` ("gptq", "awq", ...)."""
    if not isinstance(settings, dict):
        return "an unknown method"
    method = settings.get("quant_method") or "an unnamed method"
    if settings.get("load_in_4bit") or settings.get("_load_in_4bit"):
        return f"bitsandbytes 4-bit ({settings.get('bnb_4bit_quant_type', 'fp4')})"
    if settings.get("load_in_8bit") or settings.get("_load_in_8bit"):
        return "bitsandbytes 8-bit (LLM.int8)"
    return str(method)


def refuse_quantized(directory: str | os.PathLike[str]) -> None:
    """``UserError`` for a model directory quantized in a way lorakit cannot read as float
    weights: a bitsandbytes (or FP8) save whose files store packed codes and scales (integer
    ``.weight`` tensors, or bitsandbytes' quant-state keys), so ``W_ft - W0`` would compare
    storage (every layer "resized", or spectra of the codes), and any other
    ``quantization_config`` (GPTQ, AWQ, torchao, ...). A float checkpoint that still carries a
    bitsandbytes ``quantization_config`` (a QLoRA fine-tune merged to 16-bit) and an FP8 one
    (transformers dequantizes it on load) are analysed. The way out: the float checkpoint."""
    settings = _read_config(directory).get("quantization_config")
    if not settings:
        return
    float_readable = isinstance(settings, dict) and settings.get("quant_method") in _FLOAT_READ
    if float_readable and not _stores_packed_weights(Path(directory)):
        return
    raise UserError(
        f"{directory} holds a model quantized with {_quantization_name(settings)} "
        "(config.json has a quantization_config): its files store packed codes and scales, "
        "not the weights, so lorakit cannot compute W_ft - W0 from them; give the float "
        "checkpoint it was quantized from (e.g. the model named without '-bnb-4bit') instead"
    )


_FLOAT_READ = ("bitsandbytes", "fp8")  # methods whose float-stored files transformers reads
_PACKED_KEYS = (".absmax", ".SCB", ".quant_map", ".quant_state", ".weight_format", ".nested_")
_INTEGER_DTYPES = ("U8", "I8", "I16", "I32", "U16", "U32", "I64")


def _stores_packed_weights(directory: Path) -> bool:
    """Whether the checkpoint's safetensors files hold quantized storage: an integer
    ``.weight`` tensor, or a bitsandbytes quant-state key (headers read, no tensor)."""
    from lorakit.io.header import read_header

    for path in sorted(directory.glob("*.safetensors")):
        for key, info in read_header(path).tensors.items():
            if any(part in key for part in _PACKED_KEYS):
                return True
            if key.endswith(".weight") and info.dtype in _INTEGER_DTYPES:
                return True
    return False


def load_model_dir(
    spec: str | os.PathLike[str],
    task: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> nn.Module:
    """A model from a local directory or a lorakit built-in name (``lorakit.models``), offline.

    No tokenizer is needed: only the weights are analysed. ``progress=False`` hides
    transformers' weight-loading bar. ``load_model_with_new`` also names the modules the
    checkpoint lacked."""
    return load_model_with_new(spec, task, dtype, progress)[0]


def load_model_with_new(
    spec: str | os.PathLike[str],
    task: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[nn.Module, set[str]]:
    """``(model, newly initialised)``: the model of ``load_model_dir`` and the names of its
    modules holding a parameter missing from the checkpoint, which transformers initialised
    at random (a causal LM's checkpoint loaded for sequence classification: ``score``; a
    checkpoint without a pooler: ``pooler.dense``). Their weights are noise, not training."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorakit.model_checks import loading_errors
    from lorakit.models import resolve_model, transformers_progress_bars

    directory = resolve_model(str(spec))
    refuse_quantized(directory)  # (packed codes are not weights)
    task = task or detect_task(directory)
    loader = {
        "causal-lm": AutoModelForCausalLM,
        "seq-cls": AutoModelForSequenceClassification,
        None: AutoModel,
    }[task]
    with transformers_progress_bars(progress), loading_errors(directory):
        model, info = loader.from_pretrained(
            directory,
            dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
            trust_remote_code=False,  # (never run a directory's own code, nor ask to)
        )
    missing = info.get("missing_keys") or ()
    return model.eval(), {key.rsplit(".", 1)[0] if "." in key else "" for key in missing}


def adapter_dir_spectra(directory: str | os.PathLike[str]) -> list[Spectrum]:
    """Spectra of ``s B A`` for every layer of a PEFT-format adapter directory (from the factors).

    An adapter whose every update is zero (saved untrained) is refused, as two identical models
    are (``model_dirs_update``). An unconverted PiSSA / OLoRA adapter is refused (``AdapterFileError``) before its tensors are
    read: its ``s B A`` holds the base's principal part, not the update from the original base
    (``lorakit.io.read.refuse_residual_base_factors``)."""
    from lorakit.io.read import read_plain_lora

    adapter = read_plain_lora(directory, "analysing its s B A as the update of the base weights")
    spectra = tensor_spectra(adapter.tensors, adapter.config)
    if not spectra:
        raise UserError(f"the adapter in {directory} holds no LoRA A/B tensors to analyse")
    if not any(bool(torch.any(spectrum.singular_values > 0)) for spectrum in spectra):
        raise UserError(
            f"the adapter in {directory} has a zero update s B A in every layer (a factor all "
            "zeros: an adapter saved before training, PEFT's B = 0): it changes nothing, so "
            "there is no spectrum and no rank to advise; analyse the trained adapter"
        )
    return spectra


def model_dirs_spectra(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    task: str | None = None,
    progress: bool = True,
) -> list[Spectrum]:
    """Spectra of ``W_ft - W0`` for every linear layer that differs between two model directories
    (``progress=False`` hides transformers' weight-loading bars); ``model_dirs_update`` also
    names the layers left out."""
    return model_dirs_update(base, finetuned, task, progress)[0]


def model_dirs_update(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    task: str | None = None,
    progress: bool = True,
) -> tuple[list[Spectrum], list[ReshapedLayer | NewLayer | OneSidedParameter]]:
    """``(spectra, left out)``: the spectra of ``model_dirs_spectra`` and what has no trained
    ``W_ft - W0``: the linear layers of another shape in the fine-tuned model (a resized
    vocabulary's head), those newly initialised at loading (``NewLayer``: missing from a
    checkpoint or both), and every parameter only one model has (``OneSidedParameter``: a
    block the other lacks). ``UserError`` when no layer can be compared or none differs."""
    from lorakit.analysis.pairs import load_pair

    pair = load_pair(base, finetuned, task, progress)
    models = (pair.base, pair.finetuned)
    linear = {name for model in models for name, _ in linear_weights(model)}
    new = [NewLayer(n, which) for n, which in pair.newly_initialised.items() if n in linear]
    one_sided = one_sided_parameters(*models)
    try:
        spectra = update_spectra(*models, exclude=pair.newly_initialised)
        if not spectra:  # nothing differs, or nothing could be compared: say which
            refuse_incomparable(*models)
    except ValueError as error:  # every shared layer of another shape, or no layer in common
        raise UserError(str(error)) from None
    reshaped = reshaped_layers(*models)
    if not spectra:
        reasons = "".join(f"; {layer.name} has another shape" for layer in reshaped)
        reasons += "".join(f"; {layer.name}: {layer.reason}" for layer in new)
        reasons += one_sided_summary(one_sided)
        raise UserError(f"no linear layer differs between {base} and {finetuned}{reasons}")
    return spectra, [*reshaped, *new, *one_sided]


def refuse_incomparable(base: nn.Module, finetuned: nn.Module) -> None:
    """``ValueError`` when no linear layer of ``base`` can be compared with ``finetuned``'s:
    they share no layer name (two architectures, say Llama and GPT-2), or every layer they share
    has another shape there (``ReshapedLayer.error``, naming the first such layer). Returns
    when some layer can be compared (or one of them has no linear layer at all)."""
    tuned = dict(linear_weights(finetuned))
    layers = dict(linear_weights(base))
    shared = [name for name in layers if name in tuned]
    if not shared and layers and tuned:
        raise ValueError(
            "the base and the fine-tuned model share no linear layer name (the base has "
            f"{next(iter(layers))}, the fine-tuned model {next(iter(tuned))}): they are "
            "different models; compare a fine-tune with the model it was trained from"
        )
    reshaped = reshaped_layers(base, finetuned)
    if shared and len(reshaped) == len(shared):
        raise reshaped[0].error()  # "they are not the same model"


def comparable(base: nn.Module, finetuned: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two models as their layers can be compared: themselves when they are of one class;
    else their shared transformers body (``base_model``), e.g. a ``BertModel`` against the
    ``BertForSequenceClassification`` fine-tuned from it, whose layers are ``bert.``-prefixed
    and whose head the base does not have."""
    if type(base) is type(finetuned):
        return base, finetuned
    return getattr(base, "base_model", base), getattr(finetuned, "base_model", finetuned)
