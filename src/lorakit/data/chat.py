"""Chat messages -> prompt, one way for training, ``lorakit generate`` and the server.

So the same chat is the same prompt everywhere (what a model was trained on is what it is given):

- with a chat template: ``tokenizer.apply_chat_template(messages, add_generation_prompt=...)``
  as text, tokenized WITHOUT the tokenizer's own special tokens (the template writes them; a
  BOS added again would be a second one). Training tokenizes the same rendering the same way
  (``data.tokenize.chat_segments``);
- without one, the one fallback: a plain transcript, one ``<role>: <content>`` line per message
  and ``assistant:`` for the generation prompt, tokenized like a plain prompt (with the
  tokenizer's own special tokens, e.g. a BOS). The server uses it; training refuses chats
  without a template (``require_chat_template``: the transcript has no end-of-turn token, so a
  model trained on it would never learn to stop), and ``lorakit generate`` then sends its
  prompt as plain text, as it does with ``--raw``.

``lorakit generate`` sends its prompt as a user message through the template only when that is
how the model was trained: an adapter ``lorakit train`` trained on chats (``prompt_style``
"chat", recorded in the adapter file), a built-in instruct model without an adapter, or
``--chat``; a plain text prompt otherwise, as ``model.generate(**tokenizer(text))`` does.

A template that refuses the messages (Llama-2's "roles must alternate user/assistant", say)
raises ``ChatTemplateError`` with the template's message.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.errors import UserError

__all__ = [
    "ChatTemplateError",
    "chat_prompt_ids",
    "encode_chat",
    "has_chat_template",
    "prompt_style",
    "render_chat",
    "require_chat_template",
    "turn_window",
    "with_one_eos_per_turn",
]

Message = dict[str, str]  # {"role": ..., "content": ...}


class ChatTemplateError(UserError):
    """The tokenizer's chat template refused the messages."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_style(examples: Sequence) -> str:
    """The form of the prompts in ``examples`` (``data.Example``): "chat" when every example is
    a chat (rendered by the chat template), else "plain" (prompt text as is; a plain text prompt
    is then one of the forms the model learnt)."""
    return "chat" if examples and all(example.is_chat for example in examples) else "plain"


def require_chat_template(tokenizer, where: str) -> None:
    """``UserError`` naming ``where`` (an example's source) when ``tokenizer`` has no chat
    template: training needs one (see the module docstring)."""
    if not has_chat_template(tokenizer):
        raise UserError(
            f"{where}: chat messages need a tokenizer with a chat template; "
            "this tokenizer has none (use prompt/completion data; for CSV or built-in data, "
            "style='plain': --style plain on the command line)"
        )


def render_chat(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
    """The chat as prompt text: the tokenizer's chat template, or the transcript fallback
    (``user: hi\\nassistant:``); ``add_generation_prompt`` ends it where the assistant's next
    turn begins. ``ChatTemplateError`` when the template refuses the messages."""
    if not has_chat_template(tokenizer):
        transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return transcript + ("assistant:" if add_generation_prompt else "")
    from jinja2.exceptions import TemplateError  # transformers' template engine

    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as error:
        raise ChatTemplateError(
            f"the model's chat template refused the messages: {error}"
        ) from None


def encode_chat(tokenizer, text: str) -> list[int]:
    """Token ids of a ``render_chat`` text: without the tokenizer's special tokens when a
    template rendered it (the template wrote them), with them for the transcript fallback."""
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def chat_prompt_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """The token ids a model is given to answer ``messages`` (rendered with the generation
    prompt): what training saw before the answer, what the server and ``lorakit generate``
    send. (One exception, in multi-turn data: where an earlier assistant reply starts with
    whitespace that the template's newline merges with, training tokenised that reply on its
    own (``segments``), so its history differs by that merge from this rendering of the whole
    conversation: with SmolLM2's tokenizer "\n" then "  hello" is ``Ċ Ġ Ġhello`` in
    training, ``ĊĠ Ġhello`` here.)"""
    return encode_chat(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


WINDOWED_TURNS = 8
"""Chats with more assistant turns than this render each turn from a window of the chat
(``turn_window``), in time linear in the turns; shorter ones render every prefix whole, which
is quicker for them (fewer template calls: two a turn, not three)."""

_HEAD = 2  # the messages every window keeps first: a system prompt, the first user turn


def turn_window(messages: Sequence[Message], index: int, previous: int) -> list[Message]:
    """``messages[:index]`` without those between the first two and ``start``, the even
    position at or before ``previous`` (the assistant turn before ``messages[index]``; -1:
    none)::

        window = messages[:2] + messages[start:index]     start = 2 * (previous // 2) > 2

    The window keeps what templates look at besides the message they render: the first
    message (a system prompt, ``messages[0]``), the first turn (``loop.first``, Llama-2's
    system prompt inside it), each message's index parity (``loop.index0 % 2``, the roles'
    alternation) and the previous assistant turn. A template whose turns render so
    ("local": Llama-2/3, Mistral, Gemma, ChatML, SmolLM2) renders ``before + turn`` from the
    window as it renders them from ``messages[:index]``, with the dropped messages' text
    missing, so the text a turn adds is the same, at a cost independent of ``index``
    (``chat_turns.windowed_pieces`` checks the texts against the whole rendering, and every
    prefix is rendered whole where they do not fit)."""
    start = max(previous, 0) // 2 * 2
    if start <= _HEAD:
        return list(messages[:index])
    return [*messages[:_HEAD], *messages[start:index]]


def with_one_eos_per_turn(
    messages: Sequence[Message], tokenizer, windowed: bool = False
) -> tuple[Message, ...]:
    """``messages`` with the trailing EOS text dropped from each assistant content that ends
    with it, where the template ends that turn with an EOS of its own (else the turn would end
    with two EOS tokens, both learnt). ``windowed``: each turn rendered from its
    ``turn_window``."""
    eos = tokenizer.eos_token
    result, previous = list(messages), -1
    for index, message in enumerate(messages):
        content = message.get("content")
        if message["role"] != "assistant" or not isinstance(content, str):
            continue
        window = turn_window(result, index, previous) if windowed else result[:index]
        previous = index
        if not (eos and content.endswith(eos)):
            continue
        trimmed = {**message, "content": content[: -len(eos)]}
        before = render_chat(tokenizer, window, add_generation_prompt=True)
        after = render_chat(tokenizer, [*window, trimmed], add_generation_prompt=False)
        if after.startswith(before) and eos in after[len(before) :]:
            result[index] = trimmed
    return tuple(result)
