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
