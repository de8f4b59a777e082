"""One chat rendering: training, ``lorakit generate`` and the server give a model the same tokens
for the same chat, with one fallback and one error."""

from __future__ import annotations

import pytest
from tokenizers import processors

from lorakit import data
from lorakit.commands.generate import generate_text
from lorakit.data.chat import ChatTemplateError, chat_prompt_ids, render_chat
from lorakit.errors import UserError
from lorakit.serve.prompts import prompt_ids
from lorakit.serve.protocol import APIError, parse_job
from tests import tiny_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


def _bos_adding_tokenizer(chat_template: bool = True):
    """The tiny ChatML tokenizer, but (like Llama's) adding a BOS to every encoded text."""
    tokenizer = tiny_tokenizer.build(chat_template=chat_template)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _PromptRecorder:
    """Stands in for a model: records the ids ``generate`` is given."""

    def generate(self, input_ids, attention_mask, **kwargs):
        self.input_ids = input_ids[0].tolist()
        assert attention_mask.tolist() == [[1] * len(self.input_ids)]
        return input_ids


def _server_ids(tokenizer, messages) -> list[int]:
    body = {"model": "m", "messages": messages, "max_tokens": 4}
    job = parse_job(body, chat=True, max_tokens_limit=16)
    return prompt_ids(job, tokenizer, max_prompt_tokens=512, max_positions=1024)


@pytest.mark.parametrize("adds_bos", [False, True])
def test_training_generate_and_the_server_give_the_same_tokens_for_one_chat(adds_bos) -> None:
    tokenizer = _bos_adding_tokenizer() if adds_bos else tiny_tokenizer.build()
    user_only = [{"role": "user", "content": "hello world"}]
    trained = data.Example(messages=(*user_only, {"role": "assistant", "content": "hi"}))
    training = data.prompt_token_ids(trained, tokenizer)
    recorder = _PromptRecorder()
    generate_text(recorder, tokenizer, "hello world", max_new_tokens=1)
    expected = tokenizer(
        "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )["input_ids"]
    assert training == recorder.input_ids == _server_ids(tokenizer, user_only) == expected
    assert chat_prompt_ids(tokenizer, user_only) == expected
    with_system = data.Example(messages=(*CHAT, {"role": "assistant", "content": "hi"}))
    assert data.prompt_token_ids(with_system, tokenizer) == _server_ids(tokenizer, CHAT)


def test_without_a_template_the_server_uses_the_transcript_and_training_refuses() -> None:
    tokenizer = _bos_adding_tokenizer(chat_template=False)
    text = render_chat(tokenizer, CHAT, add_generation_prompt=True)
    assert text == "system: Be brief.\nuser: hello world\nassistant:"
    assert render_chat(tokenizer, CHAT, add_generation_prompt=False) == text.removesuffix(
        "assistant:"
    )
    assert _server_ids(tokenizer, CHAT) == tokenizer(text)["input_ids"]  # BOS included
    assert _server_ids(tokenizer, CHAT)[0] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    example = data.Example(messages=(*CHAT, {"role": "assistant", "content": "hi"}), source="f:3")
    with pytest.raises(
        UserError, match=r"^f:3: chat messages need a tokenizer with a chat template"
    ):
        data.prompt_token_ids(example, tokenizer)


def test_a_template_that_refuses_the_messages_is_one_error_everywhere() -> None:
    tokenizer = tiny_tokenizer.build()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}"
        "{% endif %}" + tiny_tokenizer.CHATML_TEMPLATE
    )
    messages = CHAT  # system first: refused
    message = "the model's chat template refused the messages: roles must alternate"
    with pytest.raises(ChatTemplateError, match=f"^{message}$"):
        render_chat(tokenizer, messages, add_generation_prompt=True)
    example = data.Example(messages=(*messages, {"role": "assistant", "content": "y"}))
    with pytest.raises(ChatTemplateError, match=message):  # a UserError: one line in the CLI
        data.tokenize_example(example, tokenizer, 64)
    with pytest.raises(APIError) as caught:
        _server_ids(tokenizer, messages)
    assert caught.value.status == 400 and message in str(caught.value)
    assert issubclass(ChatTemplateError, UserError)
