"""Checks of what ``lorakit.train.train`` is given, made before anything is written or run:
each would otherwise fail (or be ignored) only after the whole run."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.data.batching import innermost_model
from lorakit.errors import UserError
from lorakit.state import adapter_configs, lora_layers
from lorakit.train.config import TrainingConfig
from lorakit.train.optim import parameter_groups

__all__ = [
    "CAUSAL_LM",
    "MULTI_LABEL",
    "REGRESSION",
    "SINGLE_LABEL",
    "TOKEN_CLASSIFICATION",
    "check_inputs",
    "check_labels_fit",
    "labels_task",
    "model_task",
]

CAUSAL_LM = "causal_lm"  # labels (B, T); logits[:, t] predicts labels[:, t + 1]
TOKEN_CLASSIFICATION = "token_classification"  # labels (B, T); logits[:, t] predicts labels[:, t]
SINGLE_LABEL = "single_label_classification"  # labels (B,) class ids
REGRESSION = "regression"  # labels (B,) or (B, num_labels), real values
MULTI_LABEL = "multi_label_classification"  # labels (B, num_labels), 0/1 per label
_SEQUENCE = "sequence_classification"  # one of the last three, by transformers' rule

_HEADS = {  # (suffix of a transformers class name, the task of its own loss)
    "ForTokenClassification": TOKEN_CLASSIFICATION,
    "ForMaskedLM": TOKEN_CLASSIFICATION,  # (the same unshifted, -100-ignoring cross-entropy)
    "ForSequenceClassification": _SEQUENCE,
    "ForCausalLM": CAUSAL_LM,
    "LMHeadModel": CAUSAL_LM,
    "ForConditionalGeneration": CAUSAL_LM,  # (decoder-only ones; encoder-decoders: refused)
}
_OTHER_TRAINERS = (
    "train it with transformers.Trainer or your own loop (the injected model works unchanged there)"
)


def check_inputs(model: nn.Module, config: TrainingConfig, eval_data: Sequence[Any] | None) -> None:
    """``UserError`` unless the model has parameters to train (``parameter_groups``),
    ``config.adapter_name`` names an adapter of it (its save would fail only after the whole
    run), and evaluation data is given where ``config.eval_every`` asks for evaluations
    (else they would be silently skipped), and ``config.output_dir`` is not a file (its
    first write would fail only after a step had changed the adapter), and some layer scales the
    adapter by more than 0 (``_check_some_scale``), and the loop knows the loss of the model's
    task (``model_task``)."""
    parameter_groups(model)
    model_task(model)
    output = Path(config.output_dir) if config.output_dir else None
    if output is not None and output.exists() and not output.is_dir():
        raise UserError(
            f"output_dir {output} is a file (TrainingConfig.output_dir, --output); give a "
            "directory (new or existing)"
        )
    name, configs = config.adapter_name, adapter_configs(model)
    if name not in configs:
        has = f"its adapters: {', '.join(map(repr, sorted(configs)))}" if configs else "none"
        raise UserError(
            f"the model has no adapter named {name!r} (TrainingConfig.adapter_name; {has}): "
            "pass the name the adapter was injected under as adapter_name, or inject one "
            "under that name (lorakit.inject(model, config, adapter_name=...))"
        )
    _check_some_scale(model, name)
    if config.eval_every and not eval_data:
        raise UserError(
            f"eval_every={config.eval_every} (--eval-every) evaluates on eval_data, and none "
            "was given: pass eval_data (--eval-data SPEC), or leave eval_every at 0"
        )


def _check_some_scale(model: nn.Module, name: str) -> None:
    """``UserError`` when every layer scales adapter ``name`` by 0 (``lora_alpha`` 0, as PEFT
    allows, e.g. ``--alpha 0``) and the adapter trains nothing else (no DoRA magnitude, saved
    module, token rows or biases): ``s B A`` is then 0 and so are the gradients of A and B, so
    the run could only save an adapter that changes nothing."""
    config = adapter_configs(model)[name]
    if config.use_dora or config.modules_to_save or config.trainable_token_indices:
        return  # (magnitudes, saved copies, token rows: trained whatever s is)
    if config.bias != "none":
        return  # (the base's biases train)
    scales = [layer.scalings[name] for _, layer in lora_layers(model) if name in layer.scalings]
    if scales and all(scale == 0 for scale in scales):
        raise UserError(
            f"adapter {name!r} has lora_alpha 0 (--alpha) on every layer: its update "
            "(lora_alpha / r) B A is 0 and nothing would train. Give a non-zero lora_alpha "
            "(the default is 32; a negative one flips the update's sign)."
        )


def model_task(model: nn.Module) -> str:
    """The loss the loop computes for ``model`` (under its wrappers: ``innermost_model``), as
    the model's own loss given ``labels``: from the head suffix of the transformers class's name
    or of a class it derives from (``_HEADS``: ``class MyLlama(LlamaForCausalLM)`` is a causal
    LM); ``_SEQUENCE`` is resolved per batch by ``labels_task``. A transformers model of no
    known head suffix (BertGenerationDecoder, GPT2DoubleHeadsModel, ...) and a module that is
    not a transformers model keep the loop's documented default: ``CAUSAL_LM`` ((B,) labels:
    class ids). ``UserError`` for a transformers model whose loss the loop does not compute:
    encoder-decoders, heads of ``_REFUSED_HEADS`` (question answering, multiple choice, ...) and
    a model without a head (``*Model`` with no output embeddings, e.g. ``LlamaModel``)."""
    inner = innermost_model(model)
    if not _is_transformers_model(inner):
        return CAUSAL_LM
    names = [cls.__name__ for cls in type(inner).__mro__]
    task = next(
        (task for name in names for end, task in _HEADS.items() if name.endswith(end)), None
    )
    name = names[0]
    headless = name.endswith("Model") and inner.get_output_embeddings() is None and task is None
    refused = name.endswith(_REFUSED_HEADS) or headless
    if task in (CAUSAL_LM, None) and getattr(inner.config, "is_encoder_decoder", False):
        refused = True  # (its labels are the decoder's: the loop does not build decoder inputs)
    if refused:
        raise UserError(
            f"lorakit's training loop does not compute the loss of {name}: it trains causal "
            "LMs (*ForCausalLM), token classifiers (*ForTokenClassification, *ForMaskedLM) and "
            f"sequence classifiers (*ForSequenceClassification); {_OTHER_TRAINERS}"
        )
    return task or CAUSAL_LM


_REFUSED_HEADS = (  # transformers heads whose loss is none the loop computes
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
    "ForPreTraining",
)


def _is_transformers_model(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # (not imported: not one of its models)
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def labels_task(model: nn.Module, labels: torch.Tensor) -> str:
    """The task whose loss a batch's ``labels`` get (``model_task``, a sequence classifier's
    problem type resolved), or ``UserError`` when they do not fit it (checked shapes:
    ``_check_labels``). A sequence classifier follows transformers' rule: its
    ``config.problem_type``, else ``REGRESSION`` for ``num_labels == 1``, ``SINGLE_LABEL`` for
    integer labels, ``MULTI_LABEL`` otherwise. Other modules' (B,) labels are class ids."""
    task = model_task(model)
    if task == CAUSAL_LM and labels.dim() == 1:
        return SINGLE_LABEL
    if task == _SEQUENCE:
        config = innermost_model(model).config
        task = config.problem_type or _problem_type(config.num_labels, labels)
        if task not in _PROBLEM_TYPES:
            raise UserError(
                f"config.problem_type {task!r} of {type(innermost_model(model)).__name__} is "
                f"none of transformers' {', '.join(_PROBLEM_TYPES)}: set one of them (or None)"
            )
        why = "" if config.problem_type else _RULE[task]
        _check_labels(model, task, labels, config.num_labels, why)
    elif task == TOKEN_CLASSIFICATION:
        _check_labels(model, task, labels, None)
    return task


def check_labels_fit(model: nn.Module, collate, example: Any) -> None:
    """``labels_task`` of ``collate([example])``'s labels for a token or sequence classifier
    (``UserError`` when they do not fit its task), so that the run is refused before it writes
    anything; causal LMs (and modules that are not transformers models) are not collated here.
    (The run seeds every generator afterwards: a collate drawing random numbers changes none.)"""
    if model_task(model) != CAUSAL_LM:
        labels_task(model, collate([example])["labels"])


def _problem_type(num_labels: int, labels: torch.Tensor) -> str:
    if num_labels == 1:
        return REGRESSION
    return SINGLE_LABEL if labels.dtype in (torch.long, torch.int) else MULTI_LABEL


_LABELS_WANTED = {
    TOKEN_CLASSIFICATION: "integer labels (B, T), one class id per token (-100: no loss)",
    SINGLE_LABEL: "integer labels (B,), one class id per example",
    REGRESSION: "real labels (B,) or (B, num_labels)",
    MULTI_LABEL: "labels (B, num_labels) of 0/1 per label (floats)",
}


def _check_labels(model: nn.Module, task: str, labels: torch.Tensor, num_labels, why="") -> None:
    """``UserError`` naming the model class and the task when ``labels`` has not the shape
    (and, where the task needs class ids, the integer dtype) of ``_LABELS_WANTED[task]``."""
    rows = labels.shape[0] if labels.dim() else 0
    fits = {
        TOKEN_CLASSIFICATION: labels.dim() == 2 and not labels.is_floating_point(),
        SINGLE_LABEL: labels.dim() == 1 and not labels.is_floating_point(),
        REGRESSION: labels.dim() >= 1 and labels.numel() == rows * (num_labels or 0),
        MULTI_LABEL: tuple(labels.shape) == (rows, num_labels),
    }[task]
    if fits:
        return
    name = type(innermost_model(model)).__name__
    given = f"{str(labels.dtype).removeprefix('torch.')} labels of shape {tuple(labels.shape)}"
    classes = f", num_labels {num_labels}{why}" if num_labels is not None else ""
    raise UserError(
        f"{name} ({task}{classes}) takes {_LABELS_WANTED[task]}, got {given}: give labels of "
        f"that form{_PROBLEM_TYPE_HINT if num_labels is not None else ''}"
    )


_PROBLEM_TYPES = (REGRESSION, SINGLE_LABEL, MULTI_LABEL)
_RULE = {  # why transformers' rule chose the problem type, config.problem_type being None
    REGRESSION: " (num_labels 1: regression)",
    SINGLE_LABEL: " (integer labels: class ids)",
    MULTI_LABEL: " (labels not integers: multi-label; class ids must be torch.long)",
}
_PROBLEM_TYPE_HINT = (
    ", or set the model's config.problem_type to the task they are for ("
    + ", ".join(_PROBLEM_TYPES)
    + ")"
)
