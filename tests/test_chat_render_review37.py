"""Review 37 of the training data: a chat's template is rendered in time linear in its turns
(each assistant turn from a window of the chat, ``chat.turn_window``), with the pieces, ids,
labels and truncation of rendering every prefix whole, and the assistant masks transformers
computes from ``{% generation %}`` blocks."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken

from lorakit import data
from lorakit.data import chat_turns, segments
from lorakit.data.chat import WINDOWED_TURNS, render_chat
from lorakit.errors import UserError
from tests import tiny_tokenizer
from tests.test_data_review36 import TOKENIZERS, whole_prefix_segments

IGNORE = -100
LENGTHS = (4096, 96, 24)


def prefix_whole_pieces(example, tokenizer):
    """The oracle, HEAD's ``_chat_segments``: assistant turn i is the text between
    ``render(messages[:i], generation prompt)`` and ``render(messages[:i+1])``, every prefix
    rendered whole; trailing turns are the rest of the whole rendering where it continues."""
    eos, specials = tokenizer.eos_token, chat_turns.special_texts(tokenizer)
    messages = list(example.messages)
    for index, message in enumerate(messages):  # one EOS per turn
        content = message["content"]
        if message["role"] == "assistant" and eos and content.endswith(eos):
            trimmed = {**message, "content": content[: -len(eos)]}
            before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
            after = render_chat(
                tokenizer, [*messages[:index], trimmed], add_generation_prompt=False
            )
            if after.startswith(before) and eos in after[len(before) :]:
                messages[index] = trimmed
    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        after = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise UserError("the chat template does not render turns as a growing prefix")
        answer = after[len(before) :]
        end = chat_turns.learnt_end(answer, message["content"], eos, specials)
        pieces += [(before[len(done) :], False), (answer[:end], True), (answer[end:], False)]
        done = after
    if messages[-1]["role"] != "assistant":
        full = render_chat(tokenizer, messages, add_generation_prompt=False)
        pieces.append((full[len(done) :] if full.startswith(done) else "", False))
    return [(text, learnt) for text, learnt in pieces if text]


GEMMA_TEMPLATE = (  # Gemma's: the system prompt inside the first user turn, roles alternate
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
NUMBERED_TEMPLATE = (  # not local: each turn's number, which a window changes
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + "
    "loop.index|string + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' + "
    "(messages|length + 1)|string + '\n' }}{% endif %}"
)
LAST_SYSTEM_TEMPLATE = (  # Mistral v0.3's: the system prompt before the LAST user turn
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
    "{% endif %}{{ bos_token }}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{% if loop.last and system is defined %}"
    "{{ '<|im_start|>' + system + '\n\n' + message['content'] + '<|im_end|>' }}"
    "{% else %}{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def gemma_style():
    tokenizer = tiny_tokenizer.build()
    specials = ["<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer.add_tokens([AddedToken(text, special=True) for text in specials], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<bos>", "<end_of_turn>"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def chatml_with(template: str):
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = template
    return tokenizer


LOCAL = {**TOKENIZERS, "gemma": gemma_style}


def fuzz_chats(count: int, seed: int, turns: tuple[int, int], specials=()):
    """Chats with system prompts, ``turns`` user/assistant turns, trailing user turns, empty
    and padded contents, special-token texts, emoji, ``\\r\\n`` and EOS-ending answers."""
    rng = random.Random(seed)
    family = "👨\u200d👩\u200d👧"  # joined emoji
    words = ["the", "fox", "Paris.", "é", "日本", "🙂", family, "\n", "\r\n", " ", *specials]

    def text(most):
        breaks = ["", " ", "\n", "\r\n"]
        content = "".join(rng.choice(words) + rng.choice(breaks) for _ in range(most))
        return rng.choice(breaks) + content if rng.random() < 0.3 else content

    chats = []
    for _ in range(count):
        messages = [{"role": "system", "content": text(5)}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(*turns)):
            messages += [
                {"role": "user", "content": text(rng.randint(1, 8))},
                {"role": "assistant", "content": text(rng.randint(0, 8))},
            ]
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": text(4)})
        chats.append(data.Example(messages=tuple(messages), source="chats.jsonl:1"))
    return chats


def windows_fit(chat, tokenizer) -> bool:
    """Whether every turn of ``chat`` renders from its window (no fallback)."""
    specials = chat_turns.special_texts(tokenizer)
    return chat_turns.windowed_pieces(chat.messages, tokenizer, specials)[0] is not None


def _specials(tokenizer):
    return [tokenizer.eos_token, "<|im_end|>", "<|im_start|>", "<|eot_id|>", "</s>", "<|end|>"]


def _assert_as_before(tokenizer, chats, monkeypatch, lengths=LENGTHS) -> int:
    """Each chat's pieces are the oracle's (or both refuse it alike), its segments those of
    every prefix tokenised whole, and its ids, labels and truncation at ``lengths`` those of
    every prefix rendered whole. Returns how many chats the windows rendered."""
    windowed = 0
    for chat in chats:
        try:
            expected = prefix_whole_pieces(chat, tokenizer)
        except UserError as error:
            with pytest.raises(UserError, match=str(error).split(": ")[-1][:40]):
                segments.chat_segments(chat, tokenizer)
            continue
        windowed += windows_fit(chat, tokenizer)
        monkeypatch.setattr(segments, "WINDOWED_TURNS", 0)  # windows where they fit
        assert segments.chat_segments(chat, tokenizer) == expected, chat.messages
        assert segments.example_segments(chat, tokenizer) == whole_prefix_segments(
            tokenizer, expected
        )
        new = [data.tokenize_example(chat, tokenizer, length) for length in lengths]
        monkeypatch.setattr(segments, "WINDOWED_TURNS", 10**9)  # every prefix whole
        assert new == [data.tokenize_example(chat, tokenizer, length) for length in lengths]
    return windowed


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_windowed_turns_are_those_of_every_prefix_rendered_whole(name, monkeypatch):
    tokenizer = LOCAL[name]()
    chats = fuzz_chats(30, seed=len(name), turns=(1, 6), specials=_specials(tokenizer))
    chats += fuzz_chats(4, seed=37, turns=(11, 16), specials=_specials(tokenizer))
    accepted = [chat for chat in chats if _refusal(chat, tokenizer) is None]
    assert len(accepted) >= 20 and _assert_as_before(tokenizer, chats, monkeypatch) == len(accepted)


def _refusal(chat, tokenizer):
    try:
        prefix_whole_pieces(chat, tokenizer)
    except UserError as error:
        return error
    return None


def test_turn_numbers_a_window_changes_render_every_prefix_whole(monkeypatch):
    """A turn number (``loop.index``) renders differently in a window: the texts do not join
    up to the whole rendering, and every prefix is rendered whole, as before."""
    tokenizer = chatml_with(NUMBERED_TEMPLATE)
    chats = fuzz_chats(12, seed=3, turns=(4, 6), specials=_specials(tokenizer))  # windows drop
    assert all(_refusal(chat, tokenizer) is None for chat in chats)
    assert _assert_as_before(tokenizer, chats, monkeypatch) == 0


def test_a_system_prompt_before_the_last_user_turn_is_refused_as_before(monkeypatch):
    """Mistral v0.3's template writes the system prompt before the last user turn: every
    prefix whole, turns do not grow as a prefix and the chat is refused, windows or not; the
    chats without a system prompt render alike in windows."""
    tokenizer = chatml_with(LAST_SYSTEM_TEMPLATE)
    chats = fuzz_chats(16, seed=3, turns=(2, 6), specials=_specials(tokenizer))
    with_system = [chat for chat in chats if chat.messages[0]["role"] == "system"]
    assert with_system and all(_refusal(chat, tokenizer) for chat in with_system)
    windowed = _assert_as_before(tokenizer, chats, monkeypatch)
    assert windowed == len(chats) - len(with_system)


SHORT_CHAT_NEWLINE = (  # the generation prompt's newline only while the chat is short
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant' + ('\n' if messages|length <= 6 else '') }}{% endif %}"
)
LONG_CHAT_NEWLINE = (  # ... only once it is long: no window, only the late prefixes, have it
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant' + ('\n' if messages|length > 12 else '') }}{% endif %}"
)
MOVED_NEWLINE = (  # the newline between turns starts a turn, not ends one, in 7-14 messages
    "{% set mid = 6 < messages|length < 15 %}{% for m in messages %}"
    "{{ '\n' if mid and not loop.first else '' }}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}"
    "{{ '' if mid else '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ ('\n' if mid else '') + '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template",
    [SHORT_CHAT_NEWLINE, LONG_CHAT_NEWLINE, MOVED_NEWLINE],
    ids=["short-chat-newline", "long-chat-newline", "moved-newline"],
)
def test_a_turn_split_that_depends_on_the_chat_length_renders_every_prefix_whole(
    template, monkeypatch
):
    """Where a generation prompt or a turn's end depends on the chat's length, a window (a few
    messages) splits a turn elsewhere than the prefix rendered whole, though the texts join up
    to the whole rendering: every prefix is then rendered whole, as before (pieces, ids and
    labels; the first template gave 27 learnt tokens instead of 33). The first window finds
    the moved newline, the last turn the newline of long chats, both the first template's."""
    tokenizer = chatml_with(template)
    chats = fuzz_chats(6, seed=7, turns=(9, 14), specials=_specials(tokenizer))
    chats.append(_long_chat(9))
    assert all(_refusal(chat, tokenizer) is None for chat in chats)
    assert _assert_as_before(tokenizer, chats, monkeypatch) == 0


NINTH_MARKED = (  # the 9th or 10th message's user header: a text no window writes, as long
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + "
    "('!' if loop.index in (9, 10) and m['role'] == 'user' else '?') "
    "+ '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant?\n' }}{% endif %}"
)


def test_a_middle_turn_a_window_renders_otherwise_renders_every_prefix_whole(monkeypatch):
    """A text only the prefixes of 9 messages or more write (none of the windows), as long
    as the window's and in neither the first window nor the last turn: the
    texts do not join up to the whole rendering (checked turn by turn), so every prefix is
    rendered whole."""
    tokenizer = chatml_with(NINTH_MARKED)
    chats = fuzz_chats(6, seed=5, turns=(9, 14), specials=_specials(tokenizer))
    assert all(_refusal(chat, tokenizer) is None for chat in chats)
    assert _assert_as_before(tokenizer, chats, monkeypatch) == 0


def test_windows_that_do_not_fit_cost_a_few_renders_more_than_every_prefix_whole(monkeypatch):
    """A turn number changes in the first window, which is compared with its prefix rendered
    whole before anything else is: the turns before it (their windows the whole prefix) are
    kept and every later prefix is rendered whole, so the template renders one window and one
    prefix (5 renders of a few messages) more than every prefix whole. Before, every turn was
    rendered in windows first, and the whole chat (5 renders a turn in all, not 2)."""
    for turns in (9, 20, 30):
        chat, counts = _long_chat(turns), []
        for threshold in (WINDOWED_TURNS, 10**9):
            monkeypatch.setattr(segments, "WINDOWED_TURNS", threshold)
            tokenizer = chatml_with(NUMBERED_TEMPLATE)
            rendered = counting_renders(tokenizer)
            segments.example_segments(chat, tokenizer)
            counts.append((len(rendered), sum(rendered)))
        (calls, messages), (whole_calls, whole_messages) = counts
        assert whole_calls == 2 * turns and calls <= whole_calls + 5, (turns, counts)
        assert messages <= whole_messages + 5 * 8, (turns, counts)


GENERATION_TEMPLATE = (  # ChatML with the assistant turns in {% generation %} blocks
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_labels_are_transformers_assistant_masks(monkeypatch):
    """Where the pieces tokenise as the whole rendering does, the learnt tokens are those
    ``apply_chat_template(return_assistant_tokens_mask=True)`` marks (the content and
    ``<|im_end|>``), in windows and not."""
    tokenizer = chatml_with(GENERATION_TEMPLATE)
    words = ["the fox", "Paris.", "é 日本", "🙂", "x\r\ny", "<|im_end|> z"]
    rng, compared = random.Random(37), 0
    for turns in (1, 3, 6, 12, 24):
        messages = [{"role": "system", "content": "You answer briefly."}]
        for _ in range(turns):
            messages += [
                {"role": "user", "content": rng.choice(words)},
                {"role": "assistant", "content": rng.choice(words) + " " + rng.choice(words)},
            ]
        rendered = tokenizer.apply_chat_template(
            messages, return_dict=True, return_assistant_tokens_mask=True
        )
        chat = data.Example(messages=tuple(messages))
        for threshold in (0, 10**9):
            monkeypatch.setattr(segments, "WINDOWED_TURNS", threshold)
            input_ids, labels, _ = data.tokenize_example(chat, tokenizer, 10**6)
            if input_ids != list(rendered["input_ids"]):
                continue
            mask = rendered["assistant_masks"]
            assert [label != IGNORE for label in labels] == [bool(flag) for flag in mask]
            compared += 1
    assert compared >= 8


def counting_renders(tokenizer):
    """``tokenizer`` counting the messages its chat template is given to render."""
    rendered = []

    class Counting(type(tokenizer)):
        def apply_chat_template(self, conversation, *args, **kwargs):
            rendered.append(len(conversation))
            return super().apply_chat_template(conversation, *args, **kwargs)

    tokenizer.__class__ = Counting
    return rendered


def _long_chat(turns: int) -> data.Example:
    messages = [{"role": "system", "content": "You answer briefly."}]
    for turn in range(turns):
        messages += [
            {"role": "user", "content": f"What is the capital of France? ({turn})"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    return data.Example(messages=tuple(messages))


@pytest.mark.parametrize(
    "build", [LOCAL["chatml"], LOCAL["llama3"], LOCAL["llama2-legacy"], gemma_style]
)
def test_a_chat_renders_in_time_linear_in_its_turns(build):
    """The template renders at most 10 messages per message of the chat (9 here: three
    windows of a few messages a turn, three whole renderings: the chat, and the last turn's
    prefixes it is compared with); every prefix whole rendered 8 384 messages for a 64-turn
    chat of 129 messages (65 per message, growing with the turns)."""
    for turns in (16, 64):
        tokenizer = build()
        rendered = counting_renders(tokenizer)
        chat = _long_chat(turns)
        segments_found = segments.example_segments(chat, tokenizer)
        assert sum(learnt for _, learnt in segments_found) == turns
        assert sum(rendered) <= 10 * len(chat.messages), (turns, sum(rendered))


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_builtin_and_fuzzed_chats_are_as_every_prefix_rendered_whole(monkeypatch):
    from lorakit.models import load_tokenizer, resolve_model

    smol = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    builtin = data.load_examples("chatterbot", split="train")
    assert _assert_as_before(smol, builtin, monkeypatch) == len(builtin)
    chats = fuzz_chats(40, seed=37, turns=(1, 6), specials=_specials(smol))
    chats += fuzz_chats(4, seed=38, turns=(11, 16), specials=_specials(smol))
    assert _assert_as_before(smol, chats, monkeypatch) == len(chats)
