"""Chat tokenisation fixes (review 33): a chat ending in a user turn under a template that renders
the last assistant turn differently once another message follows (Qwen3's, Phi-3's, TRL 1.16's
files) is the rendering up to that turn, not a rendering glued to a cut-off tail; the docs say
how lorakit's masks differ from TRL's training templates and where a chat's tokens differ
between training and serving; an empty completion learns its EOS, as an empty assistant turn
learns its end-of-turn token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trl
from transformers import AutoTokenizer

from lorakit.data import load_examples, segments
from lorakit.data.chat import chat_prompt_ids, encode_chat, render_chat
from lorakit.data.examples import Example
from lorakit.data.tokenize import (
    IGNORE_INDEX,
    prompt_token_ids,
    tokenize_example,
    tokenize_examples,
)
from lorakit.errors import UserError
from lorakit.models import resolve_model
from tests import tiny_tokenizer

TEMPLATES = Path(os.path.dirname(trl.__file__)) / "chat_templates"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models-and-data.md"
PHI3_SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _tokenizer(template: str, eos: str = "<|im_end|>", specials=()):
    """The tiny byte-level tokenizer with one of TRL's chat template files."""
    tokenizer = tiny_tokenizer.build()
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    tokenizer.eos_token = eos
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tokenizer


def _learnt_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode(
        [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )


def _learnt_spans(tokenizer, ids, learnt) -> list[str]:
    """The texts of the runs of learnt tokens."""
    spans, run = [], []
    for token, flag in zip(ids, learnt, strict=True):
        if flag:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return [*spans, tokenizer.decode(run)] if run else spans


# 1. a trailing user turn under Qwen3's and Phi-3's templates

HELLO = {"role": "user", "content": "hello"}
HI = {"role": "assistant", "content": "hi"}
BYE = {"role": "user", "content": "bye"}


@pytest.mark.parametrize(
    ("template", "eos", "specials", "learnt"),
    [
        ("qwen3.jinja", "<|im_end|>", (), "<think>\n\n</think>\n\nhi<|im_end|>"),
        ("phi3.jinja", "<|endoftext|>", PHI3_SPECIALS, "hi<|end|>\n<|endoftext|>"),
    ],
)
def test_a_trailing_user_turn_that_changes_the_rendering_is_dropped(
    template, eos, specials, learnt
):
    tokenizer = _tokenizer(template, eos, specials)
    full = render_chat(tokenizer, (HELLO, HI, BYE), add_generation_prompt=False)
    upto = render_chat(tokenizer, (HELLO, HI), add_generation_prompt=False)
    assert not full.startswith(upto)  # the template rewrites the earlier text

    ids, labels, truncated = tokenize_example(Example(messages=(HELLO, HI, BYE)), tokenizer, 256)
    assert ids == encode_chat(tokenizer, upto)  # a rendering the template writes
    assert tokenizer.decode(ids) == upto
    assert _learnt_text(tokenizer, ids, labels) == learnt
    assert not truncated
    # the same sequence and labels as the chat without its trailing turn
    assert (ids, labels) == tokenize_example(Example(messages=(HELLO, HI)), tokenizer, 256)[:2]
    data = tokenize_examples([Example(messages=(HELLO, HI, BYE))], tokenizer, 256)
    assert (data.input_ids, data.labels) == ([ids], [labels])


def test_a_trailing_user_turn_stays_where_the_rendering_grows():
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    ids, labels, _ = tokenize_example(Example(messages=(HELLO, HI, BYE)), tokenizer, 256)
    full = render_chat(tokenizer, (HELLO, HI, BYE), add_generation_prompt=False)
    assert ids == encode_chat(tokenizer, full)
    assert _learnt_text(tokenizer, ids, labels) == "hi<|im_end|>"


# 2. lorakit's masks against TRL's training templates, as the docs now say

CHAT = (
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
)


@pytest.mark.parametrize(
    ("template", "specials", "trl_spans", "lorakit_spans"),
    [
        (
            "qwen2_5_training.jinja",
            (),
            ["\nHello!<|im_end|>\n", "\nCiao<|im_end|>\n"],
            ["Hello!<|im_end|>", "Ciao<|im_end|>"],
        ),
        (
            "gemma_training.jinja",
            ("<start_of_turn>", "<end_of_turn>"),
            ["Hello!<end_of_turn>\n", "Ciao<end_of_turn>\n"],
            ["Hello!<end_of_turn>", "Ciao<end_of_turn>"],
        ),
    ],
)
def test_trl_training_masks_add_the_newlines_the_docs_name(
    template, specials, trl_spans, lorakit_spans
):
    tokenizer = _tokenizer(template, specials=specials)
    trl_mask = tokenizer.apply_chat_template(
        list(CHAT), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels, _ = tokenize_example(Example(messages=CHAT), tokenizer, 512)
    assert ids == list(trl_mask["input_ids"])  # the same tokens, masked differently
    assert _learnt_spans(tokenizer, ids, trl_mask["assistant_masks"]) == trl_spans
    assert _learnt_spans(tokenizer, ids, [label != IGNORE_INDEX for label in labels]) == (
        lorakit_spans
    )


def test_phi3_chat_end_learns_the_newline_and_eos_as_trl_does():
    tokenizer = _tokenizer("phi3_training.jinja", "<|endoftext|>", PHI3_SPECIALS)
    chat = CHAT[:2]
    trl_mask = tokenizer.apply_chat_template(
        list(chat), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, labels, _ = tokenize_example(Example(messages=chat), tokenizer, 512)
    assert ids == list(trl_mask["input_ids"])
    expected = ["Hello!<|end|>\n<|endoftext|>"]
    assert _learnt_spans(tokenizer, ids, trl_mask["assistant_masks"]) == expected
    assert _learnt_spans(tokenizer, ids, [label != IGNORE_INDEX for label in labels]) == expected


def test_docs_no_longer_claim_trl_parity_for_the_newline():
    docs = DOCS.read_text(encoding="utf-8")
    assert "as TRL's assistant-only masks end" not in docs
    assert "as in TRL's assistant-only masks" not in segments._learnt_end.__doc__
    flat = " ".join(docs.split())
    assert "This differs from TRL's assistant-only masks" in flat
    assert "also learn the newline after the end-of-turn token" in flat
    assert "the newline after `<|im_start|>assistant`" in flat
    docstring = " ".join(segments._learnt_end.__doc__.split())
    assert "TRL's assistant-only masks" in docstring and "learn more: the newline" in docstring


# 3. "the same tokens in all three", with its exception


def test_same_tokens_claim_names_the_whitespace_exception():
    smol = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    chat = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  hello"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"},
    )
    trained = prompt_token_ids(Example(messages=chat), smol)
    served = chat_prompt_ids(smol, chat[:3])
    newline, space, word, merged = smol.convert_tokens_to_ids(["Ċ", "Ġ", "Ġhello", "ĊĠ"])
    start = trained.index(newline, trained.index(word) - 2)
    assert trained[start : start + 3] == [newline, space, word]
    assert merged in served and [merged, word] == served[start : start + 2]
    assert trained[:start] == served[:start] and trained[start + 3 :] == served[start + 2 :]

    flat = " ".join(DOCS.read_text(encoding="utf-8").split())
    claim = flat.index("a chat is the same tokens in all three")
    sentence = flat[claim : flat.index("Without a chat template", claim)]
    assert "with one exception" in sentence and "`chat_prompt_ids`" in sentence
    assert "`Ċ Ġ Ġhello` in training, `ĊĠ Ġhello` there" in sentence


# 4. an empty completion learns its EOS, as an empty assistant turn learns its end-of-turn token


def test_an_empty_completion_is_read_and_learns_the_eos(tmp_path):
    path = tmp_path / "empty.jsonl"
    rows = [{"prompt": "hello", "completion": ""}, {"prompt": "hello", "completion": "<|im_end|>"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    examples = load_examples(path)
    assert [example.completion for example in examples] == ["", "<|im_end|>"]

    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    prompt = list(tokenizer("hello")["input_ids"])
    eos = tokenizer.eos_token_id
    for example in examples:
        ids, labels, _ = tokenize_example(example, tokenizer, 64)
        assert ids == [*prompt, eos]
        assert labels == [IGNORE_INDEX] * len(prompt) + [eos]

    chat = Example(
        messages=({"role": "user", "content": "hello"}, {"role": "assistant", "content": ""})
    )
    ids, labels, _ = tokenize_example(chat, tokenizer, 64)
    assert [label for label in labels if label != IGNORE_INDEX] == [eos]  # the same: one EOS


def test_an_empty_completion_without_an_eos_says_why(tmp_path):
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.eos_token = None
    assert tokenizer.eos_token_id is None
    example = Example(prompt="hello", completion="", source="d.jsonl:3")
    with pytest.raises(UserError, match=r"d\.jsonl:3: the tokenizer has no EOS token") as error:
        tokenize_example(example, tokenizer, 64)
    assert "its completion is empty" in str(error.value)
    example = Example(prompt="hello", completion="x", source="d.jsonl:4")
    with pytest.raises(UserError, match=r"d\.jsonl:4: the tokenizer has no EOS token") as error:
        tokenize_example(example, tokenizer, 64)
    assert "completion is empty" not in str(error.value)


def test_an_empty_prompt_and_completion_is_refused():
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    example = Example(prompt="", completion="", source="d.jsonl:5")
    with pytest.raises(UserError, match=r"d\.jsonl:5: the prompt and the completion are both"):
        tokenize_example(example, tokenizer, 64)
