"""An assistant turn's text in a chat's rendering: where its learnt part ends, and each
turn's pieces rendered from the whole prefix before it or, in time linear in the turns, from a
window of the chat (``chat.turn_window``), checked against the whole rendering
(``windowed_pieces``). ``segments`` makes a chat's token segments from them."""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.data.chat import render_chat, turn_window, with_one_eos_per_turn
from lorakit.errors import UserError


def special_texts(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens: its named ones (EOS, pad, the additional
    special tokens) and the added tokens marked special (``<|im_end|>``, ``<end_of_turn>``,
    Phi-3's ``<|end|>``)."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts.update(token.content for token in added.values() if getattr(token, "special", False))
    return tuple(sorted((text for text in texts if text), key=lambda text: (-len(text), text)))


def learnt_end(answer: str, content: str, eos: str | None, specials: Sequence[str]) -> int:
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


def turn_texts(tokenizer, specials, content: str, done: str, before: str, after: str):
    """An assistant turn's pieces: the text ``before`` (the chat up to it, generation prompt
    included) adds to ``done`` (the chat up to the previous one), then what ``after`` adds,
    learnt up to its end-of-turn token (``learnt_end``); None where they do not grow as a
    prefix (``done`` < ``before`` < ``after``)."""
    if not (before.startswith(done) and after.startswith(before)):
        return None
    answer = after[len(before) :]
    end = learnt_end(answer, content, tokenizer.eos_token, specials)
    return [(before[len(done) :], False), (answer[:end], True), (answer[end:], False)]


def prefix_turn(tokenizer, specials, messages, index: int, done: str, after=None):
    """``(turn, after)``: ``turn_texts`` of ``messages[index]`` with ``messages[:index]``
    rendered whole (``after``: ``messages[:index + 1]`` rendered, where known)."""
    before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
    if after is None:
        after = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
    return turn_texts(tokenizer, specials, messages[index]["content"], done, before, after), after


def _window_turn(tokenizer, specials, messages, index: int, previous: int):
    """``turn_texts`` of ``messages[index]`` rendered from its ``chat.turn_window``, the
    previous assistant turn ``messages[previous]`` ending ``done`` there."""
    window = turn_window(messages, index, previous)
    done = render_chat(
        tokenizer, window[: len(window) + previous + 1 - index], add_generation_prompt=False
    )
    before = render_chat(tokenizer, window, add_generation_prompt=True)
    after = render_chat(tokenizer, [*window, messages[index]], add_generation_prompt=False)
    return turn_texts(tokenizer, specials, messages[index]["content"], done, before, after)


def windowed_pieces(chat: Sequence[dict], tokenizer, specials):
    """``(rendered, head)``: ``rendered`` is ``(messages, pieces, done)``, the ``chat`` with one
    EOS per turn, its pieces up to the last assistant turn and their text, each turn rendered
    from its window; None at the first window that does not fit, ``head`` then
    ``(pieces, done, next index)`` of the turns before it, whose window is the whole prefix (so
    rendered as every prefix whole renders them: kept)."""
    pieces, done, previous = [], "", -1
    try:
        messages = with_one_eos_per_turn(chat, tokenizer, windowed=True)
        turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        for index in turns:
            if len(turn_window(messages, index, previous)) < index:
                break
            turn, after = prefix_turn(tokenizer, specials, messages, index, done)
            if turn is None:
                return None, (pieces, done, previous + 1)
            pieces, done, previous = pieces + turn, after, index
        later = [index for index in turns if index > previous]
        windowed = _window_pieces(tokenizer, specials, messages, later, previous, done)
    except UserError:  # (every prefix whole then says what is wrong)
        return None, (pieces, done, previous + 1)
    head = (pieces, done, previous + 1)
    return (None if windowed is None else (messages, pieces + windowed[0], windowed[1])), head


def _window_pieces(tokenizer, specials, messages, turns, previous: int, done: str):
    """``(pieces, full)``: the pieces of the assistant turns ``messages[turns]``, each from its
    window, after ``done`` (the chat up to ``messages[previous]``, rendered whole), and
    ``full``, the chat up to the last turn rendered whole; None where the first or the last
    turn is not as its prefix rendered whole gives it (``_end_turns``, checked first, so that
    a template whose turns render otherwise in a window costs little more than rendering every
    prefix whole), or at the first turn whose texts do not continue ``full`` from where the
    pieces before it end (nor, for the last, from the text of the chat up to the turn before,
    rendered whole)."""
    if not turns:
        return [], done
    ends = _end_turns(tokenizer, specials, messages, turns, previous, done)
    if ends is None:
        return None
    first, last, last_done, full = ends
    pieces, offset = [], len(done)
    for index, before in zip(turns, [previous, *turns[:-1]], strict=True):
        if index == turns[-1]:
            turn = last if offset == len(last_done) else None
        elif index == turns[0]:
            turn = first
        else:
            turn = _window_turn(tokenizer, specials, messages, index, before)
        text = "".join(piece for piece, _ in turn or ())
        if turn is None or not full.startswith(text, offset):
            return None
        pieces += turn
        offset += len(text)
    return (pieces, full) if offset == len(full) else None


def _end_turns(tokenizer, specials, messages, turns, previous: int, done: str):
    """``(first, last, last_done, full)``: the first and the last of the assistant turns
    ``messages[turns]`` from their windows (``_window_pieces``), the chat up to the turn before
    the last and up to the last rendered whole; None where either turn's pieces are not those
    of its prefix rendered whole (``_as_whole_prefix``; the first compared before anything
    long is rendered).

    The two comparisons find a generation prompt or turn text that depends on the history a
    window drops and moves where a turn's text starts, ends or is learnt, which the texts
    joining up cannot show: one that depends on the chat's length (or a turn count) past a
    threshold differs at the last turn, the longest prefix, wherever it differs (the windows
    of a regular chat are all as long). Not proven: the turns between the first window and
    the last (a dependence on a length between theirs, or modulo 3: windows keep index
    parity; a template refusing only such a prefix rendered whole)."""
    first = _window_turn(tokenizer, specials, messages, turns[0], previous)
    if first is None or not _as_whole_prefix(tokenizer, specials, messages, turns[0], first, done):
        return None
    full = render_chat(tokenizer, messages[: turns[-1] + 1], add_generation_prompt=False)
    last, last_done = first, done
    if len(turns) > 1:
        last = _window_turn(tokenizer, specials, messages, turns[-1], turns[-2])
        last_done = render_chat(tokenizer, messages[: turns[-2] + 1], add_generation_prompt=False)
        if last is None or not _as_whole_prefix(
            tokenizer, specials, messages, turns[-1], last, last_done, full
        ):
            return None
    if not (full.startswith(done) and full.startswith(last_done)):
        return None
    return first, last, last_done, full


def _as_whole_prefix(tokenizer, specials, messages, index, turn, done, after=None) -> bool:
    """Whether ``turn``, rendered from its window, is the turn as the prefix rendered whole
    gives it after ``done`` (the chat up to the assistant turn before, rendered whole; ``after``
    the chat up to ``messages[index]``, where known)."""
    return prefix_turn(tokenizer, specials, messages, index, done, after)[0] == turn
