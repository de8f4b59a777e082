"""Tokenisation with loss masks: labels are -100 everywhere except the tokens the model must learn.

For an example made of segments ``s_1 .. s_m`` (each a token list, learnt or not)::

    input_ids = s_1 + s_2 + ... + s_m                     (length T <= max_length)
    labels[t] = input_ids[t] if token t is learnt else -100

Labels are aligned with ``input_ids`` (the transformers convention: the model shifts them, so
position t predicts token t+1). The segments of an example, and which are learnt:
``lorakit.data.segments``.

Too long for ``max_length``: classification examples (with ``text``, e.g. a review inside an
instruction template) are shortened by cutting whole words off the END of the text, keeping the
template, the instruction and the answer intact (``fit_example``; scoring uses the same
shortened prompt). Other examples (and those whose template alone does not fit) are cut by
tokens, keeping the last learnt answer (``_window``):

1. the tokens after the last learnt segment go first (e.g. a trailing user turn), as many as
   needed;
2. if that is not enough, tokens are dropped from the left of the prompt, after the leading
   special tokens the tokenizer puts before every text (a BOS) or, for a chat, the BOS its
   template writes first (``{{ bos_token }}``, Llama-3), which stay;
3. only if the answer alone does not fit is it cut on the right; one prompt token is kept
   before it where possible, so its first token is still predicted (and learnt).

For an example with ``choices`` the cut is measured with its longest choice as the answer, so
the prompt kept does not depend on the label (as in ``fit_example``); ``prompt_token_ids(example,
tokenizer, max_length)`` is that prompt, the one scoring uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lorakit.data.examples import Example
from lorakit.data.fit import fit_example, longest_answer, with_answer
from lorakit.data.segments import Segment, chat_segments, example_segments, token_ids
from lorakit.errors import UserError

__all__ = [
    "IGNORE_INDEX",
    "TokenizedData",
    "answer_first_token",
    "answer_token_ids",
    "chat_segments",
    "example_segments",
    "fit_example",
    "prompt_token_ids",
    "tokenize_example",
    "tokenize_examples",
]

IGNORE_INDEX = -100


@dataclass
class TokenizedData:
    """Token sequences ready for batching.

    ``input_ids[i]`` and ``labels[i]`` have equal length (<= ``max_length``); ``class_labels[i]`` is
    the example's class index (or None); ``num_truncated`` counts sequences that were cut.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_token_id: int
    class_labels: list[int | None] = field(default_factory=list)
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        """``{"input_ids": [...], "labels": [...]}`` of one sequence (a map-style dataset)."""
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def tokenize_example(
    example: Example, tokenizer, max_length: int
) -> tuple[list[int], list[int], bool]:
    """``(input_ids, labels, truncated)`` for one example, at most ``max_length`` tokens
    (shortened by ``fit_example`` first; see the module docstring)."""
    input_ids, labels, truncated, _ = _tokenize(example, tokenizer, max_length)
    return input_ids, labels, truncated


def _tokenize(
    example: Example, tokenizer, max_length: int
) -> tuple[list[int], list[int], bool, int]:
    """``tokenize_example``'s result and the position of the last learnt segment's first token
    in ``input_ids`` (the tokens before it are the prompt the answer is predicted from)."""
    fitted = fit_example(example, tokenizer, max_length)
    if fitted is not example:
        input_ids, labels, _, answer_start = _tokenize(fitted, tokenizer, max_length)
        return input_ids, labels, True, answer_start
    segments = example_segments(example, tokenizer)
    last_learnt_segment = _last_learnt_segment(segments, example)  # raises if nothing is learnt
    input_ids = [token for ids, _ in segments for token in ids]
    learnt = [flag for ids, flag in segments for _ in ids]
    labels = [
        token if flag else IGNORE_INDEX for token, flag in zip(input_ids, learnt, strict=True)
    ]
    answer_start = sum(len(ids) for ids, _ in segments[:last_learnt_segment])
    answer_end = answer_start + len(segments[last_learnt_segment][0])
    answer_room = max(answer_end - answer_start, _longest_choice_length(example, tokenizer))
    if len(input_ids) - (answer_end - answer_start) + answer_room <= max_length:
        return input_ids, labels, False, answer_start  # fits with any choice as the answer
    protected = _leading_special_count(input_ids[:answer_start], tokenizer, example.is_chat)
    kept, start, end = _window(answer_start, answer_end, answer_room, protected, max_length)
    input_ids = input_ids[:kept] + input_ids[start:end]
    labels = labels[:kept] + labels[start:end]
    return input_ids, labels, True, kept + answer_start - start


def _window(
    answer_start: int, answer_end: int, answer_room: int, protected: int, max_length: int
) -> tuple[int, int, int]:
    """``(kept, start, end)``: a sequence too long for ``max_length`` keeps its tokens
    ``[:kept] + [start:end]`` (module docstring). ``answer_room``: the answer length the cut
    makes room for (the longest choice's, for classification); ``protected``: the leading
    special tokens."""
    if answer_start + answer_room <= max_length:  # prompt and answer fit: cut what follows
        return 0, 0, max_length
    kept = protected if max_length - protected >= 2 else 0  # room for 1 prompt + 1 answer token
    context = min(answer_start - kept, max(1, max_length - kept - answer_room))
    start = answer_start - context
    return kept, start, min(answer_end, answer_start + max_length - kept - context)


def _leading_special_count(prompt: list[int], tokenizer, chat: bool = False) -> int:
    """How many tokens at the start of ``prompt`` truncation keeps: the special tokens the
    tokenizer puts before every text (a BOS; none for SmolLM2) or, for a chat, the BOS its
    template writes first (``_template_bos_count``), whichever are more."""
    by_template = _template_bos_count(prompt, tokenizer) if chat else 0
    return max(by_template, _tokenizer_special_count(prompt, tokenizer))


def _template_bos_count(prompt: list[int], tokenizer) -> int:
    """1 where the chat template writes ``bos_token`` and ``prompt`` starts with it (Llama-3,
    Mistral, Gemma: ``{{ bos_token }}...``), else 0. A tokenizer that adds no BOS itself
    (Llama-3 as transformers loads it from a GGUF file) would not protect it, and the server
    and ``lorakit generate`` always send it. (ChatML's ``<|im_start|>``, SmolLM2's BOS, starts
    each message, not the chat: its templates do not write ``bos_token``, so it is cut.)"""
    bos = getattr(tokenizer, "bos_token_id", None)
    writes_bos = "bos_token" in str(getattr(tokenizer, "chat_template", None) or "")
    return int(writes_bos and bos is not None and prompt[:1] == [bos])


def _tokenizer_special_count(prompt: list[int], tokenizer) -> int:
    """How many tokens at the start of ``prompt`` are the special tokens the tokenizer puts
    before every text (a BOS)."""
    plain = token_ids(tokenizer, "x")
    marked = token_ids(tokenizer, "x", special=True)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    for offset in range(len(marked) - len(plain) + 1):
        if marked[offset : offset + len(plain)] == plain:
            leading = marked[:offset]
            if leading and set(leading) <= special and prompt[: len(leading)] == leading:
                return len(leading)
            return 0
    return 0


def _longest_choice_length(example: Example, tokenizer) -> int:
    """How many tokens the learnt answer segment has with the longest of ``example.choices``
    (``_longest_answer``) as the answer (0 without choices): the truncation makes room for it
    whatever the label."""
    if not example.choices:
        return 0
    probe = longest_answer(example, tokenizer)
    segments = example_segments(probe, tokenizer)
    return len(segments[_last_learnt_segment(segments, probe)][0])


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int) -> TokenizedData:
    """Tokenise every example (see the module docstring for the masks and truncation)."""
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; set tokenizer.pad_token (load_model does)")
    data = TokenizedData(input_ids=[], labels=[], pad_token_id=tokenizer.pad_token_id)
    for example in examples:
        input_ids, labels, truncated = tokenize_example(example, tokenizer, max_length)
        data.input_ids.append(input_ids)
        data.labels.append(labels)
        data.class_labels.append(example.label)
        data.num_truncated += truncated
    return data


def prompt_token_ids(example: Example, tokenizer, max_length: int | None = None) -> list[int]:
    """The tokens before the last answer: what a model is given to predict that answer.

    Exactly the training tokens that precede the last learnt segment (plain: the prompt; chat:
    the messages before the last assistant turn plus the generation prompt, e.g.
    ``<|im_start|>assistant\\n``), so scoring sees what training saw. ``max_length``: those of
    the example as ``tokenize_example`` shortens it to ``max_length`` tokens (the same for
    every label of a classification example).
    """
    if max_length is not None:
        input_ids, _, _, answer_start = _tokenize(example, tokenizer, max_length)
        return input_ids[:answer_start]
    segments = example_segments(example, tokenizer)
    last = _last_learnt_segment(segments, example)
    return [token for ids, _ in segments[:last] for token in ids]


def answer_first_token(example: Example, tokenizer, answer: str) -> int:
    """The first token training learns for ``example`` with ``answer`` as its answer (the
    completion, or the last assistant content): the first token of its last learnt segment,
    as the chat template renders it (``" negative"`` after a template's ``"Assistant:"``)."""
    return answer_token_ids(example, tokenizer, answer)[0]


def answer_token_ids(example: Example, tokenizer, answer: str) -> list[int]:
    """Every token training learns for ``example`` with ``answer`` as its answer: its last
    learnt segment, the answer and what ends it (plain: EOS; ChatML: ``<|im_end|>``), as the
    template renders it after ``prompt_token_ids(example)``."""
    segments = example_segments(with_answer(example, answer), tokenizer)
    return list(segments[_last_learnt_segment(segments, example)][0])


def _last_learnt_segment(segments: Sequence[Segment], example: Example) -> int:
    learnt = [index for index, (ids, flag) in enumerate(segments) if flag and ids]
    if not learnt:
        raise UserError(f"{example.source or 'example'}: no answer tokens to learn")
    return learnt[-1]
