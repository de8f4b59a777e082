"""Classification with a causal LM by comparing next-token log-probabilities of the choices.

For each example with ``choices`` ``c_1 .. c_C`` (e.g. ``"positive"``, ``"negative"``):

    p        = prompt_token_ids(example)       the tokens training puts before the answer
                                               (chat: ... <|im_start|>assistant\\n)
    first(c) = first token of tokenizer(c) without special tokens
    score_j  = log_softmax(logits(p)[-1])[first(c_j)]      next-token log-probability
    predict  = argmax_j score_j

The choices' first tokens must differ. Prompts are batched with left padding and position ids
that start at 0 for each prompt, so a prompt's scores do not depend on its batch mates.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.batching import pad_left
from lorakit.data.examples import Example
from lorakit.data.tokenize import fit_example, prompt_token_ids
from lorakit.errors import UserError

__all__ = ["ClassificationResult", "choice_token_ids", "classify", "score_choices"]


@dataclass
class ClassificationResult:
    """``log_probs`` (N, C) float32: score of each choice; ``predictions``/``labels``: (N,)."""

    log_probs: torch.Tensor
    predictions: list[int]
    labels: list[int | None]

    @property
    def accuracy(self) -> float:
        """Fraction of examples (with a label) whose prediction equals the label."""
        pairs = [
            (p, t) for p, t in zip(self.predictions, self.labels, strict=True) if t is not None
        ]
        if not pairs:
            raise UserError("no labelled examples to compute an accuracy on")
        return sum(p == t for p, t in pairs) / len(pairs)


def choice_token_ids(choices: Sequence[str], tokenizer) -> list[int]:
    """The first token of each choice (tokenised as training tokenises answers); must differ."""
    first_tokens = []
    for choice in choices:
        ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"choice {choice!r} tokenises to nothing")
        first_tokens.append(ids[0])
    if len(set(first_tokens)) != len(first_tokens):
        raise UserError(
            f"choices {list(choices)} share a first token {first_tokens}; "
            "pick answer words that start differently"
        )
    return first_tokens


def _forward_arguments(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> torch.Tensor:
    """Next-token log-probabilities (N, C) of each example's choices (module docstring).

    All examples must share the same ``choices``. ``max_length``: examples with ``text`` are
    shortened as for training (``fit_example``: words cut off the end of the text, so that
    prompt + answer fit, the answer being the longest choice whatever the label); other prompts
    keep their last ``max_length`` tokens. Prompts are batched in order of length (less
    padding); rows of the result follow ``examples``. The model's train/eval mode is left as it is (call ``model.eval()``).
    """
    if not examples:
        raise UserError("no examples to score")
    choices = examples[0].choices
    if not choices or any(example.choices != choices for example in examples):
        raise UserError("every example needs the same non-empty choices to be scored")
    choice_ids = torch.tensor(choice_token_ids(choices, tokenizer))
    arguments = _forward_arguments(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if max_length is not None:  # the prompts training sees: text shortened to fit (fit_example)
        examples = [fit_example(example, tokenizer, max_length) for example in examples]
    prompts = [prompt_token_ids(example, tokenizer) for example in examples]
    if max_length is not None:
        prompts = [ids[-max_length:] for ids in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    scores = torch.empty(len(prompts), len(choices))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = pad_left([prompts[i] for i in rows], pad_id)
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if "position_ids" in arguments:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in arguments:
            inputs["logits_to_keep"] = 1
        logits = model(**inputs).logits[:, -1, :].float()  # (B, V) at each prompt's last token
        log_probs = torch.log_softmax(logits, dim=-1)
        scores[rows] = log_probs[:, choice_ids.to(device)].cpu()  # (B, C)
    return scores


def classify(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> ClassificationResult:
    """Predict each example's choice by ``score_choices`` and compare with its label."""
    log_probs = score_choices(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length
    )
    predictions = log_probs.argmax(dim=-1).tolist()
    return ClassificationResult(
        log_probs=log_probs, predictions=predictions, labels=[e.label for e in examples]
    )
