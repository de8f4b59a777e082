"""Review 36 of the training data: shortening a long text builds only the word prefixes it
probes (memory linear in the text), a chat's pieces are tokenised in linear time with the
ids and masks of tokenising every prefix whole, truncation keeps the BOS a chat template
writes, and tool-calling chats are refused saying so and what to do."""

from __future__ import annotations

import json
import random
import re
import tracemalloc

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorakit import data
from lorakit.data import fit
from lorakit.data.chat import render_chat
from lorakit.data.examples import chat_classification_example, plain_classification_example
from lorakit.data.segments import chat_segments, example_segments
from lorakit.errors import UserError
from tests import tiny_tokenizer
from tests.test_data_fixes import LLAMA2_TEMPLATE, legacy_tokenizer

IGNORE = -100

# ------------------------------------------------ 1: fit_example builds only the probed prefixes


def head_fit_example(example, tokenizer, max_length):
    """``fit_example`` as it was (git HEAD before review 36), every word prefix built: the
    oracle for the new one's results."""
    probe = fit.longest_answer(example, tokenizer)
    if not example.text or fit.token_count(probe, tokenizer) <= max_length:
        return example
    word_ends = [match.end() for match in re.finditer(r"\S+", example.text)]
    candidates = [example.text[:end] for end in [0, *word_ends[:-1]]]

    def fits(words):
        shortened = fit.with_text(probe, candidates[words])
        return shortened is not None and fit.token_count(shortened, tokenizer) <= max_length

    if not fits(0):
        return example
    words = fit._longest(0, len(candidates) - 1, fits)
    kept = candidates[words]
    start, end = len(kept), word_ends[words]
    if end - start > fit.LONG_WORD_CHARS:

        def fits_chars(count):
            shortened = fit.with_text(probe, example.text[: start + count])
            return shortened is not None and fit.token_count(shortened, tokenizer) <= max_length

        cut = fit._character_start(
            example.text, start + fit._longest(0, end - start - 1, fits_chars)
        )
        kept = example.text[: max(cut, start)]
    shortened = fit.with_text(example, kept)
    return example if shortened is None else shortened


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _texts():
    rng = random.Random(36)
    words = ["good", "film", "the", "quick", "brown", "fox", "dull,", "é", "🙂", "mess."]
    spaces = [" ", "  ", "\n", "\t", " \n "]
    for count in (1, 2, 7, 40, 300):
        yield "".join(rng.choice(words) + rng.choice(spaces) for _ in range(count)).strip()
    yield "a warm film " + "日本語の映画評論" * 30 + " the end"  # a long run without spaces
    yield "fine " * 5 + "👨\u200d👩\u200d👧" * 20  # joined emoji, cut by characters


def test_fit_example_shortens_as_before_on_texts_of_several_lengths(tiny):
    choices = ("fine", "very bad indeed")
    checked = 0
    for text in _texts():
        for build in (plain_classification_example, chat_classification_example):
            example = build(text, 1, choices, "Review: {text}\nSentiment:")
            full = fit.token_count(fit.longest_answer(example, tiny), tiny)
            for max_length in sorted({12, 20, 33, 64, full // 2, full - 1, full}):
                expected = head_fit_example(example, tiny, max_length)
                assert fit.fit_example(example, tiny, max_length) == expected
                checked += expected is not example
    assert checked > 30  # shortened in most of them


def test_fit_example_memory_is_linear_in_the_text(tiny):
    """A 20 KB review shortened to 64 tokens: the old list of every word prefix peaked at 40 MB
    (2,000 bytes a character, growing with the text); now ~27 bytes a character."""
    example = plain_classification_example(
        "good film " * 2000, 0, ("positive", "negative"), "Text: {text}\nLabel:"
    )
    tracemalloc.start()
    try:
        shortened = fit.fit_example(example, tiny, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shortened.text == " ".join(["good film"] * 6)  # 12 words fit (as before)
    assert peak < 100 * len(example.text)


def test_fit_example_shortens_a_text_of_whitespace_alone(tiny):
    """No word to keep: the text becomes empty (this crashed with an IndexError)."""
    example = plain_classification_example(" \n" * 3000, 0, ("positive", "negative"), "T: {text}")
    shortened = fit.fit_example(example, tiny, 64)
    assert shortened == fit.with_text(example, "")


# ------------------------------------ 2: chat pieces tokenised once, ids as every prefix whole


def whole_prefix_segments(tokenizer, pieces):
    """The oracle, HEAD's ``_joined_segments``: a piece's tokens are those of ``before + piece``
    after those of ``before`` (each tokenised whole), or where those are no prefix, those of
    ``"\\n" + piece`` after ``"\\n"``'s (the piece's alone where "\\n" merges with it)."""

    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    segments, before, before_ids = [], "", []
    for piece, learnt in pieces:
        whole = ids(before + piece)
        if whole[: len(before_ids)] == before_ids:
            segments.append((whole[len(before_ids) :], learnt))
        else:
            anchor, anchored = ids("\n"), ids("\n" + piece)
            fits = anchored[: len(anchor)] == anchor
            segments.append((anchored[len(anchor) :] if fits else ids(piece), learnt))
        before, before_ids = before + piece, whole
    return segments


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
PHI3_TEMPLATE = (  # Phi-3's own (ends a chat with EOS after <|end|>)
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n<|assistant|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
)


def llama3_style():
    """The tiny byte-level BPE with Llama-3's special tokens and template (BOS written by the
    template; the tokenizer adds none, as transformers loads Llama-3 from a GGUF file)."""
    tokenizer = tiny_tokenizer.build()
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_tokens([AddedToken(text, special=True) for text in specials], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def phi3_style():
    """Phi-3's template and tokens, ``<|end|>`` and the role tokens taking the whitespace after
    them (``rstrip``, as a tokenizer may mark them)."""
    tokenizer = tiny_tokenizer.build()
    tokens = [AddedToken(t, special=True, rstrip=True) for t in ("<|user|>", "<|end|>")]
    tokens += [AddedToken(t, special=True) for t in ("<|assistant|>", "<s>", "<|endoftext|>")]
    tokenizer.add_tokens(tokens, special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "<|endoftext|>"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


def metaspace_first():
    """A Llama-2 / Mistral tokenizer as transformers now loads them: Metaspace with
    ``prepend_scheme="first"``, which puts "▁" before a text's first part only (not after a
    special token)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(tiny_tokenizer.CORPUS + ["[INST] [/INST]"] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.pad_token = wrapped.eos_token
    wrapped.chat_template = LLAMA2_TEMPLATE
    alone, after_special = (
        wrapped.convert_ids_to_tokens(wrapped(text, add_special_tokens=False).input_ids)
        for text in ("the", "</s>the")
    )
    assert alone == ["▁the"] and after_special[1] != "▁the"  # no "▁" after a special token
    return wrapped


def _chatml():
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZERS = {
    "chatml": _chatml,
    "llama3": llama3_style,
    "phi3-rstrip": phi3_style,
    "llama2-legacy": legacy_tokenizer,
    "llama2-metaspace-first": metaspace_first,
}


def random_chats(count: int, seed: int, specials=()):
    """Multi-turn chats: system prompts, trailing user turns, empty and padded answers, text
    that holds special-token texts, contents that end with the EOS text."""
    rng = random.Random(seed)
    words = ["the", "quick", "fox", "Paris.", "é", "日本", "🙂", "\n", "\n\n", " ", "x", *specials]

    def text(most):
        content = "".join(rng.choice(words) + rng.choice(["", " ", "\n"]) for _ in range(most))
        return rng.choice(["", " ", "\n"]) + content if rng.random() < 0.3 else content

    chats = []
    for _ in range(count):
        messages = [{"role": "system", "content": text(5)}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 5)):
            messages += [
                {"role": "user", "content": text(rng.randint(1, 8))},
                {"role": "assistant", "content": text(rng.randint(0, 8))},
            ]
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": text(4)})
        chats.append(data.Example(messages=tuple(messages), source="chats.jsonl:1"))
    return chats


def _assert_as_every_prefix_whole(tokenizer, chats) -> None:
    """Each chat's segments, ids and labels are the oracle's."""
    for chat in chats:
        expected = whole_prefix_segments(tokenizer, chat_segments(chat, tokenizer))
        assert example_segments(chat, tokenizer) == expected, chat.messages
        input_ids, labels, _ = data.tokenize_example(chat, tokenizer, 10**6)
        assert input_ids == [token for ids, _ in expected for token in ids]
        assert labels == [t if learnt else IGNORE for ids, learnt in expected for t in ids]


def _linear_count(tokenizer, chats) -> int:
    """How many of ``chats`` the linear path (``piece_continuations``) tokenises."""
    from lorakit.data.prefix_ids import piece_continuations

    pieces = ([piece for piece, _ in chat_segments(chat, tokenizer)] for chat in chats)
    return sum(piece_continuations(tokenizer, texts) is not None for texts in pieces)


def _chats_for(name: str, tokenizer):
    specials = [tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "</s>", "<|end|>", "[/INST]"]
    return random_chats(40, seed=len(name), specials=specials)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_chat_tokens_are_those_of_every_prefix_tokenised_whole(name):
    tokenizer = TOKENIZERS[name]()
    _assert_as_every_prefix_whole(tokenizer, _chats_for(name, tokenizer))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_every_template_takes_the_linear_path(name):
    tokenizer = TOKENIZERS[name]()
    chats = _chats_for(name, tokenizer)
    assert _linear_count(tokenizer, chats) == len(chats)


def test_a_tokenizer_that_does_not_split_at_special_tokens_takes_the_old_path():
    """A tokenizer that puts a token before every text it tokenises (as the slow SentencePiece
    Llama tokenizer puts "▁"), so the groups tokenised alone do not give the whole text's ids:
    checked, and every prefix is tokenised whole, as before."""
    tokenizer = _chatml()

    class MarksEveryText(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            encoded = super().__call__(text, *args, **kwargs)
            rows = [encoded["input_ids"]] if isinstance(text, str) else encoded["input_ids"]
            for row in rows:
                row.insert(0, 0)  # <|endoftext|> first
            return encoded

    tokenizer.__class__ = MarksEveryText
    chats = random_chats(20, seed=5)
    assert _linear_count(tokenizer, chats) == 0
    _assert_as_every_prefix_whole(tokenizer, chats)


@pytest.mark.integration
def test_smollm2_chat_tokens_are_those_of_every_prefix_tokenised_whole():
    from lorakit.models import load_tokenizer, resolve_model

    smol = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    chats = random_chats(60, seed=2, specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    builtin = data.load_examples("chatterbot", split="train")[:60]
    _assert_as_every_prefix_whole(smol, chats + builtin)
    assert _linear_count(smol, chats + builtin) == len(chats) + len(builtin)


def counting(tokenizer):
    """``tokenizer`` counting its calls and the characters it is given."""

    class Counting(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            texts = [text] if isinstance(text, str) else list(text)
            self.calls += 1
            self.characters += sum(map(len, texts))
            return super().__call__(text, *args, **kwargs)

    tokenizer.__class__ = Counting
    tokenizer.calls = tokenizer.characters = 0
    return tokenizer


def _long_chat(turns: int) -> data.Example:
    messages = [{"role": "system", "content": "You answer briefly."}]
    for turn in range(turns):
        messages += [
            {"role": "user", "content": f"What is the capital of France? ({turn})"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    return data.Example(messages=tuple(messages))


@pytest.mark.parametrize("build", [_chatml, llama3_style, metaspace_first])
def test_tokenising_a_chat_is_linear_in_its_turns(build):
    """The tokenizer reads each chat's rendering two or three times, in 3 calls, however many
    turns it has (every prefix whole was 3 calls and ~1.5 renderings a turn: 96 renderings
    for 64 turns)."""
    for turns in (2, 8, 64):
        tokenizer = counting(build())
        chat = _long_chat(turns)
        whole = len(render_chat(tokenizer, chat.messages, add_generation_prompt=False))
        segments = example_segments(chat, tokenizer)
        assert sum(learnt for _, learnt in segments) == turns
        assert tokenizer.calls <= 3
        assert tokenizer.characters <= 3 * whole


# -------------------------------------------- 3: truncation keeps the BOS the template writes


def test_truncation_keeps_the_bos_a_chat_template_writes():
    """Llama-3's template writes ``<|begin_of_text|>``; its tokenizer (from a GGUF file) adds
    none itself. A chat cut from the left keeps it first, as the server sends it."""
    tokenizer = llama3_style()
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] != bos  # the tokenizer adds no BOS
    chat = data.Example(
        messages=(
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? " * 3},
            {"role": "assistant", "content": "Paris."},
        )
    )
    full_ids, full_labels, _ = data.tokenize_example(chat, tokenizer, 10**6)
    answer_end = max(k for k, label in enumerate(full_labels) if label != IGNORE) + 1
    assert full_ids[0] == bos and answer_end == len(full_ids) > 30
    for max_length in (12, 20, 30):
        input_ids, labels, truncated = data.tokenize_example(chat, tokenizer, max_length)
        assert truncated
        assert input_ids == [bos, *full_ids[answer_end - max_length + 1 : answer_end]]
        assert labels == [IGNORE, *full_labels[answer_end - max_length + 1 : answer_end]]
        first = next(k for k, label in enumerate(labels) if label != IGNORE)
        assert data.prompt_token_ids(chat, tokenizer, max_length) == input_ids[:first]
    chatml = _chatml()  # ChatML's <|im_start|> (SmolLM2's BOS) starts a message: still cut
    full_ids, full_labels, _ = data.tokenize_example(chat, chatml, 10**6)
    answer_end = max(k for k, label in enumerate(full_labels) if label != IGNORE) + 1
    assert full_ids[0] == chatml.bos_token_id  # <|im_start|>
    assert data.tokenize_example(chat, chatml, 12)[0] == full_ids[answer_end - 12 : answer_end]


# ------------------------------------------------ 4: tool-calling chats refused, saying why


@pytest.mark.parametrize(
    ("message", "what"),
    [
        (
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
            "holds 'tool_calls'",
        ),
        (
            {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "1"}]},
            "holds 'tool_calls'",
        ),
        ({"role": "tool", "content": "42", "tool_call_id": "1"}, "has role 'tool'"),
        ({"role": "function", "name": "f", "content": "42"}, "has role 'function'"),
        ({"role": "assistant", "content": None, "function_call": {"name": "f"}}, "'function_call'"),
    ],
)
def test_tool_calling_chats_are_refused_saying_so(tmp_path, message, what):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    chat = {"messages": [{"role": "user", "content": "q"}, message, good["messages"][1]]}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(chat) + "\n")
    with pytest.raises(UserError) as error:
        data.load_examples(str(path))
    text = str(error.value)
    assert text.startswith(f"{path}:2: messages[1] ") and what in text
    assert "tool-calling chats are not supported" in text
    assert "flatten them into text content" in text


def test_empty_tool_calls_are_not_a_tool_call(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "tool_calls": []},
        ]
    }
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (example,) = data.load_examples(str(path))
    assert example.messages[1] == {"role": "assistant", "content": "a"}


def test_the_review_bos_example_is_unchanged_for_a_tokenizer_adding_bos():
    """The same cut as before where the tokenizer adds the BOS itself (Llama-2 style)."""
    tokenizer = legacy_tokenizer()
    chat = data.Example(
        messages=(
            {"role": "user", "content": "Review: a dull, lifeless mess. " * 4},
            {"role": "assistant", "content": "negative"},
        )
    )
    full_ids, _, _ = data.tokenize_example(chat, tokenizer, 10**6)
    input_ids, _, _ = data.tokenize_example(chat, tokenizer, 10)
    assert input_ids == [tokenizer.bos_token_id, *full_ids[-9:]]
