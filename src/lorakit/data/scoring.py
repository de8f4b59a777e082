"""Classification with a causal LM by comparing next-token log-probabilities of the choices.

For each example with ``choices`` ``c_1 .. c_C`` (e.g. ``"positive"``, ``"negative"``):

    p        = prompt_token_ids(example)       the tokens training puts before the answer
                                               (chat: ... <|im_start|>assistant\\n); with
                                               max_length, those training keeps
    first(c) = the first token training learns for the example with c as its answer (the
               first token of the learnt answer segment: "positive" for SmolLM2's ChatML,
               " negative" after a template's "Assistant:")
    score_j  = log_softmax(logits(p)[-1])[first(c_j)]      next-token log-probability
    predict  = argmax_j score_j

There must be at least two choices, and their first tokens must differ. Prompts are batched
with left padding and position ids that start at 0 for each prompt, so a prompt's scores do not
depend on its batch mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.batching import forward_arguments, pad_left
from lorakit.data.examples import Example
from lorakit.data.tokenize import answer_first_token, prompt_token_ids
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


def choice_token_ids(
    choices: Sequence[str], tokenizer, example: Example | None = None
) -> list[int]:
    """The first token training learns for each choice; they must differ.

    ``example``: the token is the first of the learnt answer segment when ``example`` has the
    choice as its answer, as training tokenises it (for chat examples the template may write
    text right before the answer, which changes its first token; a Llama-2 style tokenizer
    puts a "▁" before a text tokenised alone: pass the example). Without one, the choice
    tokenised alone."""
    choices = list(choices)
    if len(choices) < 2:
        raise UserError(
            (f"only one choice {choices}" if choices else "no choices")
            + " to score, so any model would be 100% accurate; give at least two choices "
            "(for a CSV file: label_words listing every class)"
        )
    first_tokens = []
    for choice in choices:
        if not tokenizer(choice, add_special_tokens=False)["input_ids"]:
            raise UserError(f"choice {choice!r} tokenises to nothing; give a non-empty answer word")
        if example is None:
            first_tokens.append(tokenizer(choice, add_special_tokens=False)["input_ids"][0])
        else:
            first_tokens.append(answer_first_token(example, tokenizer, choice))
    if len(set(first_tokens)) != len(first_tokens):
        raise UserError(
            f"choices {choices} share a first token {first_tokens}; "
            "pick answer words that start differently"
        )
    return first_tokens


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

    All examples must share the same choices (at least two). ``max_length``: each prompt is
    the one training keeps (``prompt_token_ids(example, tokenizer, max_length)``: a long text
    shortened inside its template, else tokens cut from the left after a BOS; the same for
    every label). Prompts are batched in order of length (less padding); rows of the result
    follow ``examples``. The model's train/eval mode is left as it is (call ``model.eval()``).
    """
    if not examples:
        raise UserError("no examples to score")
    choices = examples[0].choices
    if not choices or any(example.choices != choices for example in examples):
        raise UserError("every example needs the same non-empty choices to be scored")
    choice_ids = torch.tensor(
        [choice_token_ids(choices, tokenizer, example) for example in examples]
    )  # (N, C): per example, as each is rendered
    arguments = forward_arguments(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [prompt_token_ids(example, tokenizer, max_length) for example in examples]
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
        scores[rows] = log_probs.gather(1, choice_ids[rows].to(device)).cpu()  # (B, C)
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
