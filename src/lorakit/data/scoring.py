"""Classification with a causal LM by comparing the log-probabilities of the choices.

For each example with ``choices`` ``c_1 .. c_C`` (e.g. ``"positive"``, ``"negative"``):

    p        = prompt_token_ids(example)       the tokens training puts before the answer
                                               (chat: ... <|im_start|>assistant\\n); with
                                               max_length, those training keeps
    a(c)     = the tokens training learns for the example with c as its answer (its learnt
               answer segment: "positive" <|im_end|> for SmolLM2's ChatML, " negative" <eos>
               after a template's "Assistant:")
    score_j  = log_softmax(logits(p)[-1])[a(c_j)[0]]           first token (the default)
    score_j  = sum_t log P(a(c_j)[t] | p, a(c_j)[:t])          whole answer
    predict  = argmax_j score_j

The first token's log-probability decides when the choices' first tokens differ in every
example (one forward per prompt); where some share a first token (``" 0"`` and ``" 1"`` are
``Ġ`` + a digit in byte-level BPE; ``"very good"`` and ``"very bad"``) every example is scored
by its whole answers, as lm-evaluation-harness scores a continuation (one forward per choice).
There must be at least two choices, and their answers must differ. Sequences are batched with
left padding and position ids that start at 0 for each, so a score does not depend on its batch
mates. With ``max_length``, a whole-answer sequence ``p + a(c)`` must fit in it: the prompt is
cut to make room for the longest answer, but an answer that leaves no room for a prompt token
is refused (``check_whole_answers_fit``), never run past ``max_length`` (past GPT-2's position
table, or past the limit the loss was measured under).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.batching import forward_arguments, pad_left
from lorakit.data.examples import Example
from lorakit.data.tokenize import answer_token_ids, prompt_token_ids
from lorakit.errors import UserError

__all__ = [
    "ClassificationResult",
    "check_whole_answers_fit",
    "choice_answer_ids",
    "choice_token_ids",
    "classify",
    "score_choices",
    "whole_answers_needed",
]


@dataclass
class ClassificationResult:
    """``log_probs`` (N, C) float32: score of each choice; ``predictions``/``labels``: (N,);
    ``whole_answers``: the scores are of whole answers (module docstring), not first tokens."""

    log_probs: torch.Tensor
    predictions: list[int]
    labels: list[int | None]
    whole_answers: bool = False

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
    first_tokens = [ids[0] for ids in choice_answer_ids(choices, tokenizer, example)]
    if len(set(first_tokens)) != len(first_tokens):
        raise UserError(
            f"choices {list(choices)} share a first token {first_tokens}; "
            "pick answer words that start differently, or score whole answers"
        )
    return first_tokens


def choice_answer_ids(
    choices: Sequence[str], tokenizer, example: Example | None = None
) -> list[list[int]]:
    """The tokens training learns for each choice (``answer_token_ids`` with ``example``; else
    the choice tokenised alone): at least two choices, none empty, no two the same."""
    choices = list(choices)
    if len(choices) < 2:
        raise UserError(
            (f"only one choice {choices}" if choices else "no choices")
            + " to score, so any model would be 100% accurate; give at least two choices "
            "(for a CSV file: label_words listing every class)"
        )
    answers = []
    for choice in choices:
        alone = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not alone:
            raise UserError(f"choice {choice!r} tokenises to nothing; give a non-empty answer word")
        answers.append(alone if example is None else answer_token_ids(example, tokenizer, choice))
    if len({tuple(ids) for ids in answers}) != len(answers):
        raise UserError(
            f"choices {choices} tokenise to the same answers {answers}; give distinct answer words"
        )
    return answers


def whole_answers_needed(examples: Sequence[Example], tokenizer) -> bool:
    """Some example's choices share their first token, so only whole answers tell them apart."""
    for example in examples:
        answers = choice_answer_ids(example.choices, tokenizer, example)
        if len({ids[0] for ids in answers}) != len(answers):
            return True
    return False


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    whole_answers: bool | None = None,
) -> torch.Tensor:
    """Log-probabilities (N, C) of each example's choices (module docstring).

    All examples must share the same choices (at least two). ``whole_answers``: score every
    answer token (True), the first only (False; its first tokens must differ), or the first
    unless some example's choices share it (None: ``whole_answers_needed``). ``max_length``:
    each prompt is the one training keeps (``prompt_token_ids(example, tokenizer, max_length)``:
    a long text shortened inside its template, else tokens cut from the left after a BOS; the
    same for every label); a whole answer too long to fit with it raises ``UserError``
    (``check_whole_answers_fit``). Sequences are batched in order of length (less padding);
    rows of the result follow ``examples``. The model's train/eval mode is left as it is (call
    ``model.eval()``).
    """
    if not examples:
        raise UserError("no examples to score")
    choices = examples[0].choices
    if not choices or any(example.choices != choices for example in examples):
        raise UserError("every example needs the same non-empty choices to be scored")
    if whole_answers is None:
        whole_answers = whole_answers_needed(examples, tokenizer)
    prompts = [prompt_token_ids(example, tokenizer, max_length) for example in examples]
    if whole_answers:
        answers = [choice_answer_ids(choices, tokenizer, example) for example in examples]
        if max_length is not None:  # before any forward: never past max_length
            _check_fit(examples, tokenizer, prompts, answers, max_length, "max_length")
    else:  # (N, C) first tokens, per example as each is rendered
        answers = [[[t] for t in choice_token_ids(choices, tokenizer, e)] for e in examples]
    pairs = [(i, j) for i in range(len(examples)) for j in range(len(choices))]
    sequences = [prompts[i] + answers[i][j] for i, j in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(sequences[k]))  # less padding
    scores = torch.empty(len(examples), len(choices))
    if not whole_answers:  # one forward per prompt: the last position scores every choice
        order = [k for k in order if pairs[k][1] == 0]
        sequences = [sequence[:-1] for sequence in sequences]  # the prompt alone
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if whole_answers:
            ends = [answers[pairs[k][0]][pairs[k][1]] for k in batch]
            log_probs = _answer_log_probs(model, tokenizer, [sequences[k] for k in batch], ends)
            for k, log_prob in zip(batch, log_probs, strict=True):
                scores[pairs[k]] = log_prob.sum()
        else:
            rows = [pairs[k][0] for k in batch]
            last = _next_token_log_probs(model, tokenizer, [sequences[k] for k in batch])
            choice_ids = torch.tensor([[ids[0] for ids in answers[i]] for i in rows])
            scores[rows] = last.gather(1, choice_ids.to(last.device)).cpu()  # (B, C)
    return scores


def check_whole_answers_fit(
    examples: Sequence[Example], tokenizer, max_length: int, option: str = "max_length"
) -> None:
    """``UserError`` where some example's prompt as training keeps it (``prompt_token_ids``
    with ``max_length``) followed by one of its choices' whole answers is longer than
    ``max_length`` tokens: the truncation leaves at least one prompt token (and a BOS), so an
    answer of ``max_length`` tokens or more cannot be scored whole within the limit. The
    message names the choice, its answer's token count and the least ``max_length`` that
    holds it; ``option``: how the caller spells the limit (``"--max-length"`` for the CLI)."""
    prompts = [prompt_token_ids(example, tokenizer, max_length) for example in examples]
    answers = [choice_answer_ids(example.choices, tokenizer, example) for example in examples]
    _check_fit(examples, tokenizer, prompts, answers, max_length, option)


def _check_fit(examples, tokenizer, prompts, answers, max_length: int, option: str) -> None:
    """``check_whole_answers_fit`` on the prompts (N lists of ids) and answers (N x C lists of
    ids) ``score_choices`` computed."""
    for index, (example, prompt, example_answers) in enumerate(
        zip(examples, prompts, answers, strict=True)
    ):
        longest = max(range(len(example_answers)), key=lambda j: len(example_answers[j]))
        answer_length = len(example_answers[longest])
        if len(prompt) + answer_length <= max_length:
            continue
        choice = example.choices[longest]
        shown = choice if len(choice) <= 40 else choice[:37] + "..."
        needed = _least_max_length(example, tokenizer, answer_length, max_length)
        raise UserError(
            f"choice {shown!r} of {example.source or f'example {index}'} is a whole answer "
            f"of {answer_length} tokens (with the token that ends it), and scoring it after "
            f"a prompt takes {needed} tokens, more than {option} {max_length}: give {option} "
            f"{needed} or more, or shorten the label words"
        )


def _least_max_length(example: Example, tokenizer, answer_length: int, max_length: int) -> int:
    """The least limit ``m`` at which the prompt training keeps (``prompt_token_ids`` with
    ``m``) plus ``answer_length`` tokens fits in ``m``. The kept prompt does not shrink as the
    limit grows, so from a limit that does not fit, every limit below the length it takes fails
    too: step to that length until it fits (a few steps; the full prompt bounds it)."""
    limit = max_length
    while (taken := len(prompt_token_ids(example, tokenizer, limit)) + answer_length) > limit:
        limit = taken
    return limit


def _forward(model: torch.nn.Module, tokenizer, sequences: list[list[int]], keep: int):
    """Log-probabilities (B, keep, V) at the last ``keep`` positions of left-padded
    ``sequences``, positions counted from each sequence's first token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_left(sequences, pad_id)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    arguments = forward_arguments(model)
    if "position_ids" in arguments:
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in arguments:
        inputs["logits_to_keep"] = keep
    logits = model(**inputs).logits[:, -keep:, :].float()
    return torch.log_softmax(logits, dim=-1)


def _next_token_log_probs(model, tokenizer, prompts: list[list[int]]) -> torch.Tensor:
    """(B, V): the next-token log-probabilities after each prompt."""
    return _forward(model, tokenizer, prompts, keep=1)[:, -1, :]


def _answer_log_probs(
    model, tokenizer, sequences: list[list[int]], answers: list[list[int]]
) -> list[torch.Tensor]:
    """Per sequence (a prompt followed by ``answer``), ``log P(answer[t] | everything before
    it)`` for each answer token t: the logits at the n positions before the sequence's end."""
    keep = max(len(answer) for answer in answers) + 1
    log_probs = _forward(model, tokenizer, sequences, keep)  # (B, keep, V)
    picked = []
    for row, answer in enumerate(answers):
        n = len(answer)
        targets = torch.tensor(answer, device=log_probs.device).unsqueeze(-1)  # (n, 1)
        picked.append(log_probs[row, keep - 1 - n : keep - 1].gather(-1, targets).squeeze(-1))
    return picked


def classify(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    whole_answers: bool | None = None,
) -> ClassificationResult:
    """Predict each example's choice by ``score_choices`` and compare with its label."""
    if whole_answers is None and examples:
        whole_answers = whole_answers_needed(examples, tokenizer)
    log_probs = score_choices(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        whole_answers=whole_answers,
    )
    predictions = log_probs.argmax(dim=-1).tolist()
    return ClassificationResult(
        log_probs=log_probs,
        predictions=predictions,
        labels=[e.label for e in examples],
        whole_answers=bool(whole_answers),
    )
