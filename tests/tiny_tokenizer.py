"""A tiny byte-level BPE tokenizer with a ChatML chat template, built offline in milliseconds.

Like SmolLM2's (GPT-2 style, spaces kept as ``Ġ``, ``<|im_end|>`` = eos = pad) but with a few
hundred tokens, so it pairs with tiny random models in tests.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Is this movie review positive or negative? Answer with one word.",
    "Review: a dull, lifeless mess. Sentiment: negative",
    "Review: a warm, funny and moving film. Sentiment: positive",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system hello how are you I am fine thank you",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def build(vocab_size: int = 320, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A trained byte-level BPE tokenizer (deterministic), eos = pad = ``<|im_end|>``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        wrapped.chat_template = CHATML_TEMPLATE
    return wrapped
