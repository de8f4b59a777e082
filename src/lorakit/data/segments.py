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

from collections.abc import Sequence

from lorakit.data.chat import (
    WINDOWED_TURNS,
    ChatTemplateError,
    render_chat,
    require_chat_template,
    with_one_eos_per_turn,
)
from lorakit.data.chat_turns import learnt_end, prefix_turn, special_texts, windowed_pieces
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
    (``chat_turns.learnt_end``: the last EOS, or the first special token after the content),
    and what follows it, e.g. a newline, is context.

    Turns after the last assistant turn (a trailing user or system turn) are the rest of the
    full rendering (``_trailing_text``), unless that rendering does not continue the one that
    ends at the last assistant turn: then the pieces are the rendering of the chat up to and
    including that turn.

    A chat of more than ``chat.WINDOWED_TURNS`` assistant turns renders each turn from its
    ``chat.turn_window`` (the template's cost then grows linearly with the turns, not with
    their square) where the windows fit (``chat_turns.windowed_pieces``); from the first window
    that does not, every prefix whole, as shorter chats are rendered.
    """
    require_chat_template(tokenizer, example.source or "example")
    messages, pieces, done = _turn_pieces(example, tokenizer)
    if messages[-1]["role"] != "assistant":  # else the last rendering was the whole chat
        pieces.append((_trailing_text(tokenizer, messages, done), False))
    return [(text, learnt) for text, learnt in pieces if text]


_learnt_end = learnt_end  # (its name here before ``chat_turns``; tests read it here)


def _turn_pieces(example: Example, tokenizer) -> tuple[tuple[dict, ...], list, str]:
    """``(messages, pieces, done)``: the messages with one EOS per turn, the pieces up to the
    last assistant turn and their text ``done``; from windows where they fit, else every
    prefix rendered whole (from the first window on: the turns before it rendered so already)."""
    specials = special_texts(tokenizer)
    head = ([], "", 0)  # the first turns' pieces, their text, the index after them
    if sum(message["role"] == "assistant" for message in example.messages) > WINDOWED_TURNS:
        rendered, head = windowed_pieces(example.messages, tokenizer, specials)
        if rendered is not None:
            return rendered
    messages = with_one_eos_per_turn(example.messages, tokenizer)
    pieces, done, first = head
    for index in range(first, len(messages)):
        if messages[index]["role"] != "assistant":
            continue
        turn, done = prefix_turn(tokenizer, specials, messages, index, done)
        if turn is None:
            raise UserError(
                f"{example.source or 'example'}: the chat template does not render turns as a "
                "growing prefix, so assistant tokens cannot be separated; use prompt/completion"
            )
        pieces += turn
    return messages, pieces, done


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
