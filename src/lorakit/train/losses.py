"""Loss as a SUM over target tokens plus their count, so that the loss of a step can be divided by
the number of target tokens of the WHOLE step (all micro-batches, all processes). That makes
gradient accumulation and data-parallel training give the same update as one big batch:

    loss_step = sum_{micro, rank} sum_{targets t} loss(logits_t, label_t) / N_step

The loss is the one the model's own task defines, as transformers computes it when given
``labels`` (the task: ``lorakit.train.inputs.labels_task``), as a sum over targets:

- causal LM: ``labels`` (B, T) aligned with ``input_ids`` (-100 = ignored); token t is predicted
  from position t - 1; targets: label tokens t >= 1 that are not -100;
- token classification (and masked LM): ``labels`` (B, T), logits (B, T, C); position t predicts
  ``labels[:, t]`` (no shift); targets: labels not -100;
- sequence classification, by ``config.problem_type`` (else transformers' rule): class ids (B,)
  (cross-entropy; targets: rows not -100), regression (B,) or (B, k) (squared error summed over
  the k outputs / k; targets: rows), multi-label (B, C) 0/1 (binary cross-entropy with logits
  summed over the C labels / C; targets: rows). Divided by the rows, each is the model's mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.batching import forward_arguments
from lorakit.errors import UserError
from lorakit.train.inputs import (
    CAUSAL_LM,
    MULTI_LABEL,
    REGRESSION,
    SINGLE_LABEL,
    TOKEN_CLASSIFICATION,
    labels_task,
)

__all__ = ["batch_loss_sum", "evaluate", "exact_match_counts", "target_count"]

Batch = dict[str, torch.Tensor]
MetricFn = Callable[[torch.Tensor, Batch], dict[str, tuple[float, int]]]


def target_count(batch: Batch, task: str | None = None) -> int:
    """How many targets carry loss (see the module docstring): shifted label tokens != -100 for
    a causal LM, label tokens != -100 for token classification, class ids != -100 for
    single-label and rows for regression and multi-label classification. ``task`` None: by the
    labels' shape ((B,): class ids, else causal LM)."""
    labels = batch["labels"]
    if task is None:
        task = SINGLE_LABEL if labels.dim() == 1 else CAUSAL_LM
    if task == CAUSAL_LM:
        return int((labels[:, 1:] != -100).sum())
    if task in (TOKEN_CLASSIFICATION, SINGLE_LABEL):
        return int((labels != -100).sum())
    return int(labels.shape[0])


def _on_device_of(model: nn.Module, batch: Batch) -> Batch:
    """The batch's tensors on the device of the model's first parameter (a model on a GPU
    takes the CPU-collated batch there; on the CPU nothing is copied)."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type in ("cpu", "meta"):
        return batch
    return {k: v.to(parameter.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forward(model: nn.Module, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)``; for a causal LM aligned as ``logits[:, j]`` predicts
    ``labels[:, j + 1]``, for other tasks the model's logits and the batch's labels.

    For causal LMs that accept ``logits_to_keep``, logits are computed only at the K columns
    that predict a target (plus one repeated column, so the shift still lines up); with short
    answers (classification) this skips most of the vocabulary projection and its backward.
    Then logits are (B, K + 1, V) and labels (B, K + 1) = [-100, labels at those columns + 1].
    """
    batch = _on_device_of(model, batch)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch["labels"]
    if task == CAUSAL_LM and labels.dim() == 2 and "logits_to_keep" in forward_arguments(model):
        predicting = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()  # (K,) columns t-1
        if 0 < len(predicting) + 1 < labels.shape[1]:
            columns = torch.cat([predicting, predicting[-1:]])  # (K + 1,)
            output = model(**inputs, logits_to_keep=columns)
            aligned = torch.full(
                (labels.shape[0], len(columns)), -100, dtype=labels.dtype, device=labels.device
            )
            aligned[:, 1:] = labels[:, predicting + 1]
            return output.logits, aligned
    output = model(**inputs)
    return (output.logits if hasattr(output, "logits") else output[0]), labels


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in float32. logits (B, T, V) with labels (B, T), or (B, C) with (B,)."""
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    shifted_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def task_loss_sum(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed loss of ``task`` (module docstring), in float32 or wider. Causal LM and (B,)
    labels of other modules: ``logits_loss_sum``. Shapes: token classification logits
    (B, T, C), labels (B, T); sequence classification logits (B, C) (regression: (B, k)),
    labels (B,) class ids, (B,) or (B, k) values, (B, C) 0/1."""
    if task == CAUSAL_LM:
        return logits_loss_sum(logits, labels)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if task in (TOKEN_CLASSIFICATION, SINGLE_LABEL):
        return F.cross_entropy(
            wide.reshape(-1, wide.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
    rows = labels.shape[0]
    wide = wide.reshape(rows, -1)  # (B, k)
    targets = labels.reshape(rows, -1).to(wide.dtype)  # (B, k)
    if task == REGRESSION:  # mean over B k, as MSELoss: sum / k here, / B by the loop
        return F.mse_loss(wide, targets, reduction="sum") / wide.shape[1]
    assert task == MULTI_LABEL, task
    return F.binary_cross_entropy_with_logits(wide, targets, reduction="sum") / wide.shape[1]


def batch_loss_sum(
    model: nn.Module, batch: Batch, task: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(summed loss over targets, logits, labels aligned with the logits)`` for one batch;
    ``task``: ``labels_task(model, batch["labels"])`` unless given."""
    task = task or labels_task(model, batch["labels"])
    logits, labels = _forward(model, batch, task)
    return task_loss_sum(task, logits, labels), logits, labels


def exact_match_counts(
    logits: torch.Tensor, batch: Batch, task: str | None = None
) -> dict[str, tuple[float, int]]:
    """Accuracy for classification-style data: an example is right when the argmax prediction
    matches every one of its target tokens (teacher forcing; token classification: every
    labelled token), or its class for (B,) labels, or, multi-label, every label's
    ``logit > 0`` its 0/1 label. Returns ``{"accuracy": (correct, examples)}``; nothing for
    regression. ``task`` None: by the labels' shape, as ``target_count``."""
    labels = batch["labels"]
    if task == REGRESSION:
        return {}
    if task == MULTI_LABEL:
        right = ((logits > 0) == (labels > 0.5)).all(dim=-1)
        return {"accuracy": (float(right.sum()), int(labels.shape[0]))}
    if labels.dim() == 1:
        return {"accuracy": (float((logits.argmax(-1) == labels).sum()), int(labels.numel()))}
    shift = 0 if task == TOKEN_CLASSIFICATION else 1
    predictions = logits[:, : logits.shape[1] - shift].argmax(-1)  # (B, T - shift)
    targets = labels[:, shift:]
    scored = targets != -100
    wrong = ((predictions != targets) & scored).any(dim=1)
    has_target = scored.any(dim=1)
    correct = (~wrong & has_target).sum()
    return {"accuracy": (float(correct), int(has_target.sum()))}


NO_EVAL_TARGETS = (
    "the evaluation data has no target tokens (every label is -100), so its loss is "
    "undefined: give eval_data (--eval-data) examples with at least one label != -100"
)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], metric_fn: MetricFn | None = exact_match_counts
) -> dict[str, float]:
    """Mean loss per target over all batches (and each metric's ratio), model in eval mode.

    The model's previous train/eval mode is restored afterwards. ``UserError`` when the
    batches hold no target at all (every label -100): the mean is then undefined, and 0.0
    would read as a perfect score.
    """
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    metric_totals: dict[str, list[float]] = {}
    try:
        for batch in batches:
            task = labels_task(model, batch["labels"])
            batch_loss, logits, labels = batch_loss_sum(model, batch, task)
            loss_sum += float(batch_loss)
            count += target_count(batch, task)
            metrics = _metrics(metric_fn, task, logits, {**batch, "labels": labels})
            for name, (value, n) in metrics.items():
                totals = metric_totals.setdefault(name, [0.0, 0])
                totals[0] += value
                totals[1] += n
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError(NO_EVAL_TARGETS)
    results = {"loss": loss_sum / count}
    results.update({name: value / max(n, 1) for name, (value, n) in metric_totals.items()})
    return results


def _metrics(metric_fn: MetricFn | None, task: str, logits: torch.Tensor, batch: Batch):
    """``metric_fn(logits, batch)``; the default ``exact_match_counts`` is told the task."""
    if metric_fn is None:
        return {}
    if metric_fn is exact_match_counts:
        return exact_match_counts(logits, batch, task)
    return metric_fn(logits, batch)
