"""Fixes in the training-data pipeline: tokens of a text continuing its prompt (Llama-2 style
"legacy" tokenizers), one EOS per answer, scoring and training through lorakit's PeftModel,
and CSV/JSONL reading errors."""

from __future__ import annotations

import csv
import functools

import pytest
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import lorakit
from lorakit import data
from lorakit.data import csv_rows
from lorakit.data.examples import chat_classification_example, plain_classification_example
from lorakit.data.segments import chat_segments, example_segments
from lorakit.errors import UserError
from lorakit.train.losses import batch_loss_sum
from tests import tiny_tokenizer
from tests.tiny_models import randomize_adapters

IGNORE = -100

LEGACY_CORPUS = [
    "Review: a dull, lifeless mess. Sentiment: negative",
    "Review: a warm, funny and moving film. Sentiment: positive",
    "Text: hello Label: positive negative [INST] [/INST] the capital of France is Paris",
] * 8

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
    "{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@functools.cache
def legacy_tokenizer() -> PreTrainedTokenizerFast:
    """A toy Llama-2 / Mistral-v0.1 style tokenizer (as their tokenizer.json: BPE on
    SentencePiece pieces, normalizer Prepend("▁") + Replace(" ", "▁"), BOS added, no
    pre-tokenizer): every text it tokenises gets a "▁" in front."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=list("\n[]/"),
        show_progress=False,
    )
    tokenizer.train_from_iterator(LEGACY_CORPUS, trainer=trainer)
    tokenizer.pre_tokenizer = None
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.pad_token = wrapped.eos_token
    wrapped.chat_template = LLAMA2_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer.build()
    tok.pad_token = tok.eos_token
    return tok


def learnt_ids(input_ids: list[int], labels: list[int]) -> list[int]:
    return [token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE]


def learnt_tokens(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(learnt_ids(input_ids, labels))


# ----------------------------------------------------------------- 1: legacy tokenizers


def test_legacy_tokenizer_puts_a_space_token_before_a_text_alone() -> None:
    tok = legacy_tokenizer()  # the trap the fix avoids
    alone = tok(" positive", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone) == ["▁", "▁positive"]


def test_legacy_plain_tokens_are_those_of_prompt_plus_completion() -> None:
    tok = legacy_tokenizer()
    example = plain_classification_example(
        "a warm film", 0, ("positive", "negative"), data.SENTIMENT_TEMPLATE
    )
    input_ids, labels, truncated = data.tokenize_example(example, tok, 100)
    whole = tok(example.prompt + example.completion)["input_ids"]
    assert input_ids == [*whole, tok.eos_token_id]
    assert learnt_tokens(tok, input_ids, labels) == ["▁positive", "</s>"]
    assert data.prompt_token_ids(example, tok) == tok(example.prompt)["input_ids"]
    assert not truncated


def test_legacy_chat_tokens_are_those_of_the_whole_rendering() -> None:
    tok = legacy_tokenizer()
    example = chat_classification_example(
        "a warm film", 0, ("positive", "negative"), "Review: {text}"
    )
    input_ids, labels, _ = data.tokenize_example(example, tok, 100)
    rendered = tok.apply_chat_template(list(example.messages), tokenize=False)
    assert input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert learnt_tokens(tok, input_ids, labels) == ["▁positive", "▁", "</s>"]
    prompt = tok.apply_chat_template(
        list(example.messages[:-1]), tokenize=False, add_generation_prompt=True
    )
    assert data.prompt_token_ids(example, tok) == tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_legacy_choice_tokens_are_the_first_learnt_tokens(style: str) -> None:
    tok = legacy_tokenizer()
    make = plain_classification_example if style == "plain" else chat_classification_example
    template = data.SENTIMENT_TEMPLATE if style == "plain" else "Review: {text}"
    choices = ("positive", "negative")
    examples = [make("a warm film", label, choices, template) for label in (0, 1)]
    first_learnt = []
    for example in examples:
        input_ids, labels, _ = data.tokenize_example(example, tok, 100)
        first_learnt.append(learnt_ids(input_ids, labels)[0])
    assert data.choice_token_ids(examples[0].choices, tok, examples[0]) == first_learnt
    assert tok.convert_ids_to_tokens(first_learnt) == ["▁positive", "▁negative"]


def test_legacy_scores_are_next_token_log_probs_of_the_answer_tokens() -> None:
    tok = legacy_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ).eval()
    example = plain_classification_example(
        "a warm film", 0, ("positive", "negative"), data.SENTIMENT_TEMPLATE
    )
    scores = data.score_choices(model, tok, [example])
    prompt = torch.tensor([tok(example.prompt)["input_ids"]])
    log_probs = torch.log_softmax(model(prompt).logits[0, -1].float(), dim=-1)
    answer_ids = tok.convert_tokens_to_ids(["▁positive", "▁negative"])
    torch.testing.assert_close(scores[0], log_probs[answer_ids], rtol=1e-5, atol=1e-6)


def test_byte_level_segments_equal_each_piece_tokenised_alone(tiny) -> None:
    """The joint rule changes nothing for byte-level BPE where pieces meet at a pre-token cut
    (the built-in data; checked on all of it with SmolLM2's tokenizer)."""
    plain = plain_classification_example(
        "a dull mess", 1, ("positive", "negative"), "Review: {text}\nSentiment:"
    )
    chat = chat_classification_example("a dull mess", 1, ("positive", "negative"), "Review: {text}")
    alone = tiny(" negative", add_special_tokens=False)["input_ids"]
    prompt = tiny(plain.prompt, add_special_tokens=True)["input_ids"]
    assert example_segments(plain, tiny) == [(prompt, False), ([*alone, tiny.eos_token_id], True)]
    pieces = chat_segments(chat, tiny)
    expected = [(tiny(text, add_special_tokens=False)["input_ids"], flag) for text, flag in pieces]
    assert example_segments(chat, tiny) == expected


# ----------------------------------------------------------------- 4: one EOS per answer


def test_plain_completion_ending_with_eos_gets_one_eos(tiny) -> None:
    with_eos = data.Example(prompt="Q: capital of France?\nA:", completion=" Paris<|im_end|>")
    without = data.Example(prompt="Q: capital of France?\nA:", completion=" Paris")
    assert data.tokenize_example(with_eos, tiny, 64) == data.tokenize_example(without, tiny, 64)
    input_ids, labels, _ = data.tokenize_example(with_eos, tiny, 64)
    assert learnt_ids(input_ids, labels) == [
        *tiny(" Paris", add_special_tokens=False)["input_ids"],
        tiny.eos_token_id,
    ]


def test_chat_answer_ending_with_eos_gets_one_eos(tiny) -> None:
    def chat(answer: str) -> data.Example:
        return data.Example(
            messages=(
                {"role": "user", "content": "capital of France?"},
                {"role": "assistant", "content": answer},
            )
        )

    assert data.tokenize_example(chat("Paris<|im_end|>"), tiny, 64) == data.tokenize_example(
        chat("Paris"), tiny, 64
    )
    input_ids, _, _ = data.tokenize_example(chat("Paris<|im_end|>"), tiny, 64)
    assert input_ids.count(tiny.eos_token_id) == 2  # the user's turn end and the answer's


def test_chat_answer_eos_kept_where_the_template_adds_none(tiny) -> None:
    tok = tiny_tokenizer.build()
    tok.pad_token = tok.eos_token
    tok.chat_template = (  # ends turns with a newline, not with an EOS
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    example = data.Example(
        messages=(
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello<|im_end|>"},
        )
    )
    input_ids, labels, _ = data.tokenize_example(example, tok, 64)
    assert input_ids.count(tok.eos_token_id) == 1
    assert labels[input_ids.index(tok.eos_token_id)] == tok.eos_token_id


# ----------------------------------------------------------------- 3: through PeftModel


def _gpt2_peft(tokenizer):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256)
    ).eval()  # absolute positions: left padding shifts them unless position_ids are given
    peft_model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["c_attn"]))
    randomize_adapters(peft_model)
    return peft_model.eval()


def test_forward_arguments_look_through_peft_model(tiny) -> None:
    from lorakit.data.batching import forward_arguments, innermost_model

    peft_model = _gpt2_peft(tiny)
    assert innermost_model(peft_model) is peft_model.get_base_model()
    assert {"position_ids", "logits_to_keep"} <= forward_arguments(peft_model)
    ddp_like = torch.nn.Module()
    ddp_like.module = peft_model  # DDP / FSDP keep the model as .module
    assert innermost_model(ddp_like) is peft_model.get_base_model()


def test_peft_model_scores_do_not_depend_on_batch_mates(tiny) -> None:
    peft_model = _gpt2_peft(tiny)
    texts = ["a dull mess", "a warm, funny and moving film that the quick brown fox jumps " * 2]
    examples = [
        chat_classification_example(text, 0, ("positive", "negative"), "Review: {text}")
        for text in texts
    ]
    one_by_one = torch.cat([data.score_choices(peft_model, tiny, [e]) for e in examples])
    batched = data.score_choices(peft_model, tiny, examples, batch_size=2)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_training_a_peft_model_uses_only_the_predicting_logits(tiny) -> None:
    peft_model = _gpt2_peft(tiny)
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, 4:] = input_ids[:, 4:]  # columns 3 and 4 predict targets
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    loss, logits, _ = batch_loss_sum(peft_model, batch)
    assert logits.shape[:2] == (2, 3)  # K = 2 predicting columns + 1
    full = peft_model(input_ids=input_ids).logits
    expected = torch.nn.functional.cross_entropy(
        full[:, 3:5].reshape(-1, full.shape[-1]), input_ids[:, 4:6].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- 2, 5: file reading


def test_csv_field_longer_than_csv_default_limit_is_read(tmp_path) -> None:
    text = "word " * 30_000  # 150,000 characters > csv's default 131,072
    path = tmp_path / "big.csv"
    path.write_text(f'text,label\n"{text}",pos\nshort,neg\n', encoding="utf-8")
    limit_before = csv.field_size_limit()
    examples = data.load_examples(str(path))
    assert [example.text for example in examples] == [text.strip(), "short"]
    assert csv.field_size_limit() == limit_before  # restored


def test_csv_error_is_a_user_error_naming_the_line(tmp_path, monkeypatch) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text,label\nshort,pos\n" + "x" * 50 + ",neg\n", encoding="utf-8")

    def small_limit(_: int):
        csv.field_size_limit(20)  # what the default limit does to a longer field
        return csv_rows.contextlib.nullcontext()

    limit_before = csv.field_size_limit()
    monkeypatch.setattr(csv_rows, "_field_size_limit", small_limit)
    try:
        with pytest.raises(UserError, match=r"long\.csv:3: not readable as CSV .*field limit"):
            data.load_examples(str(path))
    finally:
        csv.field_size_limit(limit_before)


def test_empty_csv_says_the_file_is_empty(tmp_path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.csv: the file is empty; write a header row"):
        data.load_examples(str(path))


@pytest.mark.parametrize(
    "content",
    ['{\n "prompt": "a",\n "completion": " b"\n}\n', '[{"prompt": "a", "completion": " b"}]\n'],
)
def test_jsonl_not_one_object_per_line_says_so(tmp_path, content: str) -> None:
    path = tmp_path / "pretty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=r"pretty\.jsonl:1: .*one JSON object per line"):
        data.load_examples(str(path))


def test_label_missing_from_label_words_says_to_add_it(tmp_path) -> None:
    path = tmp_path / "lw.csv"
    path.write_text("text,label\ngood,fresh\nbad,rotten\nmeh,neutral\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"lw\.csv:4: label 'neutral' .*add it to label_words"):
        data.load_examples(str(path), label_words={"fresh": "positive", "rotten": "negative"})
