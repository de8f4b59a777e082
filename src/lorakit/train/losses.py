"""Loss as a SUM over target tokens plus their count, so that the loss of a step can be divided by
the number of target tokens of the WHOLE step (all micro-batches, all processes). That makes
gradient accumulation and data-parallel training give the same update as one big batch:

    loss_step = sum_{micro, rank} sum_{tokens t} CE(logits_t, label_t) / N_step

Causal LM batches: ``labels`` (B, T) aligned with ``input_ids`` (-100 = ignored); token t is
predicted from position t - 1. Sequence classification: ``labels`` (B,) class ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.batching import forward_arguments
from lorakit.errors import UserError

__all__ = ["batch_loss_sum", "evaluate", "exact_match_counts", "target_count"]

Batch = dict[str, torch.Tensor]
MetricFn = Callable[[torch.Tensor, Batch], dict[str, tuple[float, int]]]


def target_count(batch: Batch) -> int:
    """How many targets carry loss: shifted label tokens != -100, or rows for classification."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return int(labels.numel())
    return int((labels[:, 1:] != -100).sum())


def _on_device_of(model: nn.Module, batch: Batch) -> Batch:
    """The batch's tensors on the device of the model's first parameter (a model on a GPU
    takes the CPU-collated batch there; on the CPU nothing is copied)."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type in ("cpu", "meta"):
        return batch
    return {k: v.to(parameter.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)``, aligned as ``logits[:, j]`` predicts ``labels[:, j + 1]``.

    For causal LMs that accept ``logits_to_keep``, logits are computed only at the K columns
    that predict a target (plus one repeated column, so the shift still lines up); with short
    answers (classification) this skips most of the vocabulary projection and its backward.
    Then logits are (B, K + 1, V) and labels (B, K + 1) = [-100, labels at those columns + 1].
    """
    batch = _on_device_of(model, batch)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    labels = batch["labels"]
    if labels.dim() == 2 and "logits_to_keep" in forward_arguments(model):
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


def batch_loss_sum(
    model: nn.Module, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(summed loss over targets, logits, labels aligned with the logits)`` for one batch."""
    logits, labels = _forward(model, batch)
    return logits_loss_sum(logits, labels), logits, labels


def exact_match_counts(logits: torch.Tensor, batch: Batch) -> dict[str, tuple[float, int]]:
    """Accuracy for classification-style data: an example is right when the argmax prediction
    matches every one of its target tokens (teacher forcing), or its class for (B,) labels.
    Returns ``{"accuracy": (correct, examples)}``."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return {"accuracy": (float((logits.argmax(-1) == labels).sum()), int(labels.numel()))}
    predictions = logits[:, :-1].argmax(-1)  # (B, T-1)
    targets = labels[:, 1:]
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
            batch_loss, logits, labels = batch_loss_sum(model, batch)
            loss_sum += float(batch_loss)
            count += target_count(batch)
            metrics = metric_fn(logits, {**batch, "labels": labels}) if metric_fn else {}
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
