"""The token segments of an example: each a list of token ids, learnt or not
(``lorakit.data.tokenize`` joins them and masks the labels).

Plain examples are two segments: the prompt (tokenised with the tokenizer's own special tokens,
e.g. a BOS) and ``completion + EOS`` (learnt; no second EOS when the completion already ends
with the EOS text; an empty completion learns the EOS alone, as an empty assistant turn learns
its end-of-turn token and as TRL's completion masks do). Chat examples are rendered with the
tokenizer's chat template by ``data.chat.render_chat`` (the rendering the server and ``lorakit
generate`` use too; the pieces are tokenized without special tokens); each assistant turn's
content up to and including its end-of-turn token (its last EOS, or where EOS is not the
end-of-turn token, the first special token after the content) is learnt, everything else
(system, user, role headers, the newline after the end-of-turn token) is not.

A piece's tokens are those it adds after the text before it (``_continuation``)::

    tokens(piece) = ids(before + piece)[len(ids(before)):]   if ids(before) is a prefix of it
                    ids("\\n" + piece)[len(ids("\\n")):]       otherwise (a token spans the cut)

so the sequence is the one the model sees at inference (the prompt tokenised, then the answer
continuing it): a Llama-2 style tokenizer, which prepends "▁" to every text it tokenises, gives
``"Sentiment: positive"`` the tokens ``... ':' '▁positive'``, not ``... ':' '▁' '▁positive'``.
Where a token spans the cut (a prompt ending in a space, ``"Sentiment: " + "positive"``, whose
joint tokens end ``'▁Sentiment:' '▁positive'`` while the prompt's alone end ``'▁Sentiment:'
'▁'``), the piece is tokenised as continuing a fixed anchor, a newline (``_tokens_continuing``),
so that it gets no "▁" of its own: ``'▁' 'pos' 'itive'``, which spells the joint text (the
prompt, then the piece), not ``'▁' '▁positive'``, which would add a space the text lacks.
For byte-level BPE tokenizers (GPT-2, SmolLM2) this equals tokenising each piece alone where
the pieces meet at a pre-tokenizer split (before " word", a newline or a special token), as in
all the built-in data. A chat's pieces get these same tokens from two or three tokenisations of
its whole text (``prefix_ids.piece_continuations``, grouping it at the template's special
tokens), not one of ``before + piece`` per piece, which grew with the square of the turns;
where that grouping does not give the whole text's tokens, each ``before + piece`` is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from lorakit.data.chat import (
    WINDOWED_TURNS,
    ChatTemplateError,
    render_chat,
    require_chat_template,
    turn_window,
    with_one_eos_per_turn,
)
from lorakit.data.examples import Example
from lorakit.data.prefix_ids import piece_continuations
from lorakit.errors import UserError

__all__ = ["Segment", "chat_segments", "example_segments", "token_ids"]

Segment = tuple[list[int], bool]  # (token ids, learnt?)


def token_ids(tokenizer, text: str, special: bool = False) -> list[int]:
    """The ids of ``text`` tokenised alone (with the tokenizer's special tokens if ``special``)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _continuation(
    tokenizer, before: str, before_ids: list[int], piece: str, special: bool = False
) -> tuple[list[int], list[int]]:
    """``(piece_ids, whole_ids)`` with ``whole_ids = ids(before + piece)``: ``piece_ids`` are the
    tokens ``piece`` adds after ``before_ids = ids(before)`` (module docstring), or, when
    ``before_ids`` is not a prefix of ``whole_ids`` (a token spans the cut), those it adds after
    the anchor (``_tokens_continuing``)."""
    whole_ids = token_ids(tokenizer, before + piece, special)
    if whole_ids[: len(before_ids)] == before_ids:
        return whole_ids[len(before_ids) :], whole_ids
    return _tokens_continuing(tokenizer, piece), whole_ids


_ANCHOR = "\n"  # no letter merges with it: Llama-2/Mistral write it as the byte <0x0A>


def _tokens_continuing(tokenizer, piece: str) -> list[int]:
    """The tokens of ``piece`` continuing a text: ``ids(anchor + piece)[len(ids(anchor)):]``,
    without the "▁" a Llama-2 style tokenizer puts before a text tokenised alone (``"positive"``
    alone is ``'▁positive'``; after the anchor ``'pos' 'itive'``); ``ids(piece)`` where the
    anchor's tokens are not a prefix of those (the piece's start merged with it, e.g. a
    tokenizer with a "\\n\\n" token). Byte-level BPE, which adds no "▁", gives ``ids(piece)``."""
    anchor_ids = token_ids(tokenizer, _ANCHOR)
    anchored = token_ids(tokenizer, _ANCHOR + piece)
    if anchored[: len(anchor_ids)] == anchor_ids:
        return anchored[len(anchor_ids) :]
    return token_ids(tokenizer, piece)


# A chat with one assistant turn renders as three pieces (before the answer, the answer, after):
# piece by piece it takes as many tokenizer calls as ``piece_continuations`` and none batched,
# which starts the tokenizer's worker threads (1.2-1.5x the time on the built-in chat data).
ONE_TURN_PIECES = 3


def _joined_segments(tokenizer, pieces: Sequence[tuple[str, bool]]) -> list[Segment]:
    """Token segments of text pieces (no special tokens added), each the tokens it adds after
    the pieces before it (``_continuation``), by ``prefix_ids.piece_continuations`` (the text
    tokenised two or three times, not once per piece) where it applies, else piece by piece."""
    if len(pieces) <= ONE_TURN_PIECES:  # (as many tokenizer calls piece by piece, unbatched)
        return _joined_segments_whole(tokenizer, pieces)
    continued = piece_continuations(tokenizer, [piece for piece, _ in pieces])
    if continued is None:
        return _joined_segments_whole(tokenizer, pieces)
    return [
        (_tokens_continuing(tokenizer, piece) if ids is None else ids, learnt)
        for (piece, learnt), ids in zip(pieces, continued, strict=True)
    ]


def _joined_segments_whole(tokenizer, pieces: Sequence[tuple[str, bool]]) -> list[Segment]:
    """``_joined_segments`` tokenising the text before each piece whole (``_continuation``)."""
    segments: list[Segment] = []
    before, before_ids = "", []
    for piece, learnt in pieces:
        piece_ids, before_ids = _continuation(tokenizer, before, before_ids, piece)
        segments.append((piece_ids, learnt))
        before += piece
    return segments


def _without_final_eos(text: str, eos: str | None) -> str:
    """``text`` less a trailing EOS text (the caller ends it with one EOS token itself)."""
    return text[: -len(eos)] if eos and text.endswith(eos) else text


def chat_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """``_chat_segments``; a template that refuses the messages is named with the example's
    ``file:line``."""
    try:
        return _chat_segments(example, tokenizer)
    except ChatTemplateError as error:
        raise ChatTemplateError(f"{example.source or 'example'}: {error}") from None


def _chat_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The chat rendered as ``(text, learnt)`` pieces whose concatenation is the full rendering.

    Assistant turn i is the text the template adds between ``messages[:i]`` with a generation
    prompt and ``messages[:i+1]``; its learnt part ends at its end-of-turn token
    (``_learnt_end``: the last EOS, or the first special token after the content), and what
    follows it, e.g. a newline, is context.

    Turns after the last assistant turn (a trailing user or system turn) are the rest of the
    full rendering (``_trailing_text``), unless that rendering does not continue the one that
    ends at the last assistant turn: then the pieces are the rendering of the chat up to and
    including that turn.

    A chat of more than ``chat.WINDOWED_TURNS`` assistant turns renders each turn from its
    ``chat.turn_window`` (the template's cost then grows linearly with the turns, not with
    their square), where the pieces join up to the whole rendering; else, and where any
    window fails, every prefix whole.
    """
    require_chat_template(tokenizer, example.source or "example")
    if sum(message["role"] == "assistant" for message in example.messages) > WINDOWED_TURNS:
        with contextlib.suppress(UserError):  # (the prefixes whole then say what is wrong)
            pieces = _rendered_pieces(example, tokenizer, windowed=True)
            if pieces is not None:
                return pieces
    return _rendered_pieces(example, tokenizer, windowed=False)


def _rendered_pieces(example: Example, tokenizer, windowed: bool) -> list | None:
    """``_chat_segments``' pieces, each turn rendered from its window (``windowed``; None
    where the pieces do not join up to the whole rendering) or every prefix whole."""
    specials = _special_texts(tokenizer)
    messages = with_one_eos_per_turn(example.messages, tokenizer, windowed)
    pieces: list[tuple[str, bool]] = []
    done, previous = "", -1
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        window = turn_window(messages, index, previous) if windowed else messages[:index]
        if len(window) < index:  # the text before the window's previous turn: not ``done``'s
            done_window = window[: len(window) + previous + 1 - index]
            done = render_chat(tokenizer, done_window, add_generation_prompt=False)
        before = render_chat(tokenizer, window, add_generation_prompt=True)
        after = render_chat(tokenizer, [*window, message], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise UserError(
                f"{example.source or 'example'}: the chat template does not render turns as a "
                "growing prefix, so assistant tokens cannot be separated; use prompt/completion"
            )
        answer = after[len(before) :]
        end = _learnt_end(answer, message["content"], tokenizer.eos_token, specials)
        pieces += [(before[len(done) :], False), (answer[:end], True), (answer[end:], False)]
        done, previous = after, index
    if windowed:  # ``done``: the rendering up to the last assistant turn, whole
        done = render_chat(tokenizer, messages[: previous + 1], add_generation_prompt=False)
        if "".join(text for text, _ in pieces) != done:
            return None
    if messages[-1]["role"] != "assistant":  # else the last rendering was the whole chat
        pieces.append((_trailing_text(tokenizer, messages, done), False))
    return [(text, learnt) for text, learnt in pieces if text]


def _trailing_text(tokenizer, messages: Sequence[dict], done: str) -> str:
    """The text the full rendering of ``messages`` adds after ``done``, the rendering of the
    messages up to their last assistant turn; "" where it does not start with ``done``.

    Qwen3's template renders an assistant turn after the last user turn with an empty
    ``<think>`` block and Phi-3's ends a chat with EOS, so once a user turn follows, the earlier
    text changes (``...hi<|end|>\n<|endoftext|>`` becomes ``...hi<|end|>\n<|user|>...``). Cutting
    the full rendering at ``len(done)`` would then glue a piece of it to ``done`` (the ids end
    ``...<|endoftext|>|end|>...``: a text the template never writes). The trailing turns are
    dropped instead: they train nothing (every learnt token comes before them, and a causal
    model predicts a token only from the tokens before it, so the loss and its gradient are the
    same without them; truncation drops them first too, and ``prompt_token_ids``, scoring and
    the split key use only what precedes the last assistant turn), and the sequence is then a
    rendering the template does write, that of the chat ending at its last assistant turn.
    (Refusing the chat would turn away data that is fine to train on.)"""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    return full[len(done) :] if full.startswith(done) else ""


def _special_texts(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens: its named ones (EOS, pad, the additional
    special tokens) and the added tokens marked special (``<|im_end|>``, ``<end_of_turn>``,
    Phi-3's ``<|end|>``)."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts.update(token.content for token in added.values() if getattr(token, "special", False))
    return tuple(sorted((text for text in texts if text), key=lambda text: (-len(text), text)))


def _learnt_end(answer: str, content: str, eos: str | None, specials: Sequence[str]) -> int:
    """Where the learnt part of an assistant turn's text ``answer`` (its ``content`` as the
    template renders it, then the template's tail) ends: after the turn's end-of-turn token.

    - EOS in the tail (after the content; the whole ``answer`` where the content is not found):
      after the last EOS (SmolLM2's ``<|im_end|>``, Llama-3-Instruct's ``<|eot_id|>``);
    - else after the first special token that follows the content (the end-of-turn token where
      it is not EOS: ChatML ``<|im_end|>`` with Qwen2.5 base's EOS ``<|endoftext|>``, Gemma's
      ``<end_of_turn>``, Phi-3's ``<|end|>``), so the newline the template writes after it is
      not learnt;
    - else (no special token ends the turn) the whole ``answer``.

    So lorakit learns the content and the end-of-turn token (and, where the template writes
    EOS after that, up to the EOS: Phi-3's ``<|end|>\n<|endoftext|>`` ending a chat). TRL's
    assistant-only masks (``SFTTrainer(assistant_only_loss=True)`` with its
    ``chat_templates/*_training.jinja``, TRL 1.16) learn more: the newline after the
    end-of-turn token (Qwen2.5's, Gemma's, Phi-3's ``{% generation %}`` blocks end with it) and,
    for Qwen2.5, also the newline after ``<|im_start|>assistant`` before the content, which
    lorakit counts as the generation prompt (the text ``chat_prompt_ids`` ends with).
    """
    content_end = _content_end(answer, content, specials)
    tail = answer if content_end is None else answer[content_end:]
    if eos and eos in tail:
        return answer.rfind(eos) + len(eos)
    if content_end is None:
        return len(answer)
    found = [(tail.find(text), -len(text)) for text in specials if text in tail]
    if not found:
        return len(answer)
    position, minus_length = min(found)  # the first; the longest of those starting there
    return content_end + position - minus_length


def _content_end(answer: str, content: str, specials: Sequence[str]) -> int | None:
    """The position in ``answer`` after the content: after the last occurrence of ``content``
    (or of it stripped, for templates that trim it, as Gemma's) that a special token follows;
    0 for an empty content (or a blank one not found as it is); None where it is not found so
    (the caller then keeps to the last EOS, or learns the whole turn)."""
    for needle in (content, content.strip()):
        if not needle:
            return 0
        start = answer.rfind(needle)
        while start >= 0:
            if any(text in answer[start + len(needle) :] for text in specials):
                return start + len(needle)
            start = answer.rfind(needle, 0, start + len(needle) - 1)
    return None


def example_segments(example: Example, tokenizer) -> list[Segment]:
    """Token segments of one example (see the module docstring)."""
    if example.is_chat:
        return _joined_segments(tokenizer, chat_segments(example, tokenizer))
    where = example.source or "example"
    completion_text = _without_final_eos(example.completion, tokenizer.eos_token)
    if tokenizer.eos_token_id is None:
        why = " (its completion is empty: the EOS would be all it learns)"
        raise UserError(
            f"{where}: the tokenizer has no EOS token to end completions with"
            f"{'' if completion_text else why}; set tokenizer.eos_token"
        )
    prompt = token_ids(tokenizer, example.prompt, special=True)
    completion, _ = _continuation(tokenizer, example.prompt, prompt, completion_text, special=True)
    if not prompt and not completion:
        raise UserError(
            f"{where}: the prompt and the completion are both empty, so no token comes before "
            "the EOS to predict it from (nothing to learn); give a prompt"
        )
    return [(prompt, False), ([*completion, tokenizer.eos_token_id], True)]
