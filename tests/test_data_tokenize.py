"""Tokenisation masks, truncation, length-bucketed batches, padding, and choice scoring, on a tiny
byte-level BPE tokenizer with a ChatML template and tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit import data
from lorakit.data.examples import chat_classification_example, plain_classification_example
from lorakit.errors import UserError
from tests import tiny_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer.build()
    tok.pad_token = tok.eos_token
    return tok


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_plain_labels_exactly_on_completion_and_eos(tokenizer) -> None:
    example = data.Example(prompt="Review: a dull film\nSentiment:", completion=" negative")
    input_ids, labels, truncated = data.tokenize_example(example, tokenizer, max_length=100)
    prompt, completion = ids(tokenizer, example.prompt), ids(tokenizer, " negative")
    eos = tokenizer.eos_token_id
    assert input_ids == [*prompt, *completion, eos]
    assert labels == [IGNORE] * len(prompt) + [*completion, eos]
    assert not truncated
    assert data.prompt_token_ids(example, tokenizer) == prompt


def test_chat_labels_exactly_on_assistant_turns(tokenizer) -> None:
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    )
    example = data.Example(messages=messages)
    input_ids, labels, _ = data.tokenize_example(example, tokenizer, max_length=500)
    full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    assert input_ids == ids(tokenizer, full_text)  # the pieces tokenise like the whole text
    learnt_runs, run = [], []
    for token, label in zip(input_ids, labels, strict=True):
        assert label in (IGNORE, token)
        if label == IGNORE and run:
            learnt_runs.append(tokenizer.decode(run))
            run = []
        elif label != IGNORE:
            run.append(token)
    assert learnt_runs == ["Hello.<|im_end|>", "Paris.<|im_end|>"]
    prompt = data.prompt_token_ids(example, tokenizer)
    expected_prompt = tokenizer.apply_chat_template(
        list(messages[:4]), tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(prompt) == expected_prompt
    assert input_ids[: len(prompt)] == prompt


def test_truncation_keeps_the_answer(tokenizer) -> None:
    example = data.Example(prompt="the quick brown fox jumps over the lazy dog", completion=" yes")
    full_ids, full_labels, _ = data.tokenize_example(example, tokenizer, max_length=1000)
    answer_length = sum(label != IGNORE for label in full_labels)
    for max_length in (answer_length + 1, answer_length + 3, len(full_ids) - 1):
        input_ids, labels, truncated = data.tokenize_example(example, tokenizer, max_length)
        assert truncated and len(input_ids) == max_length
        assert input_ids == full_ids[-max_length:]  # prompt cut on the left
        assert labels == full_labels[-max_length:]
    long_answer = data.Example(prompt="Q:", completion=" the quick brown fox jumps over")
    full_ids, full_labels, _ = data.tokenize_example(long_answer, tokenizer, 1000)
    prompt_length = len(ids(tokenizer, "Q:"))
    input_ids, labels, _ = data.tokenize_example(long_answer, tokenizer, 4)
    # the answer's start kept, after the last prompt token (test_a_long_answer_keeps_one_...)
    assert input_ids[1:] == full_ids[prompt_length : prompt_length + 3] == labels[1:]

    tokenized = data.tokenize_examples([example, long_answer, example], tokenizer, max_length=6)
    assert tokenized.num_truncated == 3 and tokenized.lengths == [6, 6, 6]
    assert tokenized.pad_token_id == tokenizer.eos_token_id
    input_ids, labels, _ = data.tokenize_example(long_answer, tokenizer, 6)
    assert tokenized[1] == {"input_ids": input_ids, "labels": labels}


def test_tokenizer_requirements(tokenizer) -> None:
    chat = data.Example(
        messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"})
    )
    no_template = tiny_tokenizer.build(chat_template=False)
    no_template.pad_token = no_template.eos_token
    with pytest.raises(UserError, match="chat template"):
        data.tokenize_examples([chat], no_template, 32)
    no_pad = tiny_tokenizer.build()
    with pytest.raises(UserError, match="no pad token"):
        data.tokenize_examples([chat], no_pad, 32)
    with pytest.raises(UserError, match="at least 2"):
        data.tokenize_examples([chat], tokenizer, 1)


def test_length_grouped_batches_partition_determinism_and_bucketing() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(50)]
    plan = data.length_grouped_batches(lengths, 4, seed=1)
    assert sorted(i for batch in plan for i in batch) == list(range(50))
    assert plan == data.length_grouped_batches(lengths, 4, seed=1)
    assert plan != data.length_grouped_batches(lengths, 4, seed=2)
    assert sorted(len(b) for b in plan) == [2] + [4] * 12
    assert all(len(b) == 4 for b in data.length_grouped_batches(lengths, 4, seed=1, drop_last=True))
    # One chunk covering everything, no shuffle: batches are consecutive runs of sorted lengths.
    ordered = data.length_grouped_batches(lengths, 4, shuffle=False, bucket_batches=100)
    flat_lengths = [lengths[i] for batch in ordered for i in batch]
    assert flat_lengths == sorted(lengths)

    # Bucketing pads less than batching in random order.
    def padding(batches_: list[list[int]]) -> int:
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches_
        )

    random_order = data.length_grouped_batches(lengths, 4, seed=1, bucket_batches=1)
    assert padding(plan) < padding(random_order)


def test_length_grouped_batches_drop_last_leaves_out_random_examples_not_the_longest() -> None:
    # 10 examples, batches of 4, one chunk: 2 are left out each epoch. Sorting the chunk before
    # dropping its short batch would always leave out the 2 longest (lengths 9 and 10).
    lengths = list(range(1, 11))
    left_out: list[int] = []
    for seed in range(200):
        plan = data.length_grouped_batches(lengths, 4, seed=seed, drop_last=True)
        assert [len(b) for b in plan] == [4, 4]
        kept = {i for batch in plan for i in batch}
        left_out += [lengths[i] for i in range(10) if i not in kept]
    assert len(left_out) == 400
    assert set(left_out) == set(lengths)  # every example is sometimes the one left out
    assert abs(sum(left_out) / len(left_out) - 5.5) < 0.5  # the mean length, not the longest
    # Without shuffling the last examples in order are left out, as DataLoader's drop_last does.
    plan = data.length_grouped_batches(lengths, 4, shuffle=False, drop_last=True)
    assert sorted(i for batch in plan for i in batch) == list(range(8))


def test_collate_right_pads_and_masks() -> None:
    tokenized = data.TokenizedData(
        input_ids=[[5, 6, 7], [8, 9]], labels=[[IGNORE, 6, 7], [IGNORE, 9]], pad_token_id=0
    )
    batch = data.collate(tokenized, [1, 0])
    assert batch["input_ids"].tolist() == [[8, 9, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 9, IGNORE], [IGNORE, 6, 7]]
    input_ids, attention_mask = data.pad_left([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_training_loops_collate_pads_exactly_like_data_collate() -> None:
    from lorakit.train import pad_collate

    tokenized = data.TokenizedData(
        input_ids=[[5, 6, 7], [8, 9], [4]],
        labels=[[IGNORE, 6, 7], [IGNORE, 9], [4]],
        pad_token_id=2,
    )
    ours = data.collate(tokenized, [1, 0, 2])
    theirs = pad_collate(2)([tokenized[1], tokenized[0], tokenized[2]])
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert all(tensor.dtype == torch.long for tensor in theirs.values())
    no_labels = pad_collate(2)([{"input_ids": [8, 9]}, {"input_ids": torch.tensor([4])}])
    assert no_labels["labels"].tolist() == [[8, 9], [4, IGNORE]]  # every token learnt
    assert no_labels["input_ids"].tolist() == [[8, 9], [4, 2]]


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def sentiment_examples() -> list[data.Example]:
    reviews = [("a warm, funny film", 0), ("a dull, lifeless mess", 1), ("fine", 0)]
    reviews += [("the lazy dog of a movie: dull, dull, dull and lifeless", 1)]
    return [
        data.Example(
            messages=(
                {"role": "user", "content": f"Is this movie review positive or negative? {text}"},
                {"role": "assistant", "content": ("positive", "negative")[label]},
            ),
            choices=("positive", "negative"),
            label=label,
        )
        for text, label in reviews
    ]


def test_batch_loss_equals_per_token_reference(tokenizer) -> None:
    """model(**batch).loss is the mean cross-entropy over exactly the learnt tokens, padding
    and prompts excluded (reference: float64 log-softmax of each unpadded sequence)."""
    model = tiny_llama(len(tokenizer))
    tokenized = data.tokenize_examples(sentiment_examples(), tokenizer, max_length=64)
    batch = data.collate(tokenized, list(range(len(tokenized))))
    loss = model(**batch).loss
    total, count = 0.0, 0
    for input_ids, labels in zip(tokenized.input_ids, tokenized.labels, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([input_ids])).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(len(input_ids) - 1):
            target = labels[position + 1]
            if target != IGNORE:
                total -= log_probs[position, target].item()
                count += 1
    examples = sentiment_examples()
    assert count == sum(len(ids(tokenizer, e.answer)) + 1 for e in examples)  # answer + <|im_end|>
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_score_choices_matches_unpadded_forward(tokenizer, build) -> None:
    model = build(len(tokenizer))
    examples = sentiment_examples()
    scores = data.score_choices(model, tokenizer, examples, batch_size=3)
    choice_ids = data.choice_token_ids(("positive", "negative"), tokenizer)
    assert choice_ids == [ids(tokenizer, "positive")[0], ids(tokenizer, "negative")[0]]
    for row, example in enumerate(examples):
        prompt = data.prompt_token_ids(example, tokenizer)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1].double()
        expected = torch.log_softmax(logits, dim=-1)[choice_ids]
        torch.testing.assert_close(scores[row].double(), expected, atol=1e-5, rtol=1e-5)
    result = data.classify(model, tokenizer, examples, batch_size=2)
    assert result.predictions == scores.argmax(-1).tolist()
    expected_accuracy = sum(
        p == e.label for p, e in zip(result.predictions, examples, strict=True)
    ) / len(examples)
    assert result.accuracy == expected_accuracy


LONG_REVIEW = (
    "a warm and funny film about a lazy dog that jumps over the quick brown fox , then the "
    "movie turns dull and lifeless for an hour , and the fine cast cannot save the mess"
)


def _longest_prefix_that_fits(render, tokenizer, max_length: int) -> str:
    """By hand: the most words of LONG_REVIEW whose rendering (whole text, tokenised at once)
    takes at most max_length tokens; checks every word count."""
    words = LONG_REVIEW.split(" ")
    fitting = [k for k in range(len(words) + 1) if len(render(" ".join(words[:k]))) <= max_length]
    return " ".join(words[: max(fitting)])


def test_a_long_review_is_shortened_inside_the_template(tokenizer) -> None:
    """Too long for max_length: words are cut off the END of the review, so the instruction,
    the "Review:" frame and the answer survive (a left cut would lose the instruction)."""
    chat = chat_classification_example(
        LONG_REVIEW, 1, data.SENTIMENT_LABELS, data.SENTIMENT_INSTRUCTION
    )
    plain = plain_classification_example(
        LONG_REVIEW, 1, data.SENTIMENT_LABELS, data.SENTIMENT_TEMPLATE
    )

    def render_chat(text: str) -> list[int]:
        messages = [
            {"role": "user", "content": data.SENTIMENT_INSTRUCTION.format(text=text)},
            {"role": "assistant", "content": "negative"},
        ]
        return ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))

    def render_plain(text: str, answer: str = " negative") -> list[int]:
        prompt = data.SENTIMENT_TEMPLATE.format(text=text)
        return tokenizer(prompt)["input_ids"] + ids(tokenizer, answer) + [tokenizer.eos_token_id]

    for example, render, max_length in ((chat, render_chat, 80), (plain, render_plain, 30)):
        assert len(render(LONG_REVIEW)) > max_length + 10  # really too long
        kept = _longest_prefix_that_fits(render, tokenizer, max_length)
        assert 3 <= len(kept.split()) < len(LONG_REVIEW.split())
        input_ids, labels, truncated = data.tokenize_example(example, tokenizer, max_length)
        assert truncated and input_ids == render(kept)  # exactly the shortened text, whole
        learnt = tokenizer.decode([label for label in labels if label != IGNORE])
        assert learnt == ("negative<|im_end|>" if example is chat else " negative<|im_end|>")
        fitted = data.fit_example(example, tokenizer, max_length)
        assert fitted.text == kept and fitted.label == 1 and fitted.choices == example.choices
    # the budget is measured with the longest choice: fits exactly; the chat form is longer
    budget = max(len(render_plain(LONG_REVIEW, choice)) for choice in plain.choices)
    tokenized = data.tokenize_examples([chat, plain], tokenizer, max_length=budget)
    assert tokenized.num_truncated == 1 and tokenized.input_ids[1] == render_plain(LONG_REVIEW)


def test_the_cut_does_not_depend_on_the_label(tokenizer) -> None:
    """Answers of 1 and 3+ tokens: the same review is cut to the same words for either label,
    so the prompt's length never tells which label an example has."""
    words = ("good", "very bad indeed")
    assert len(ids(tokenizer, " " + words[1])) > len(ids(tokenizer, " " + words[0]))
    fitted = [
        data.fit_example(
            plain_classification_example(LONG_REVIEW, label, words, "Review: {text}\nVerdict:"),
            tokenizer,
            30,
        )
        for label in (0, 1)
    ]
    assert fitted[0].text == fitted[1].text and len(fitted[0].text) < len(LONG_REVIEW)
    assert fitted[0].prompt == fitted[1].prompt
    assert (fitted[0].completion, fitted[1].completion) == (" good", " very bad indeed")


def test_scoring_sees_the_prompt_training_sees(tokenizer) -> None:
    """score_choices with max_length scores the shortened review (instruction kept), exactly
    as an example written with the shortened text from the start."""
    model = tiny_llama(len(tokenizer))
    example = chat_classification_example(
        LONG_REVIEW, 0, data.SENTIMENT_LABELS, data.SENTIMENT_INSTRUCTION
    )
    kept = data.fit_example(example, tokenizer, 80).text
    by_hand = chat_classification_example(
        kept, 0, data.SENTIMENT_LABELS, data.SENTIMENT_INSTRUCTION
    )
    scores = data.score_choices(model, tokenizer, [example], max_length=80)
    expected = data.score_choices(model, tokenizer, [by_hand])
    assert torch.equal(scores, expected)
    prompt = tokenizer.decode(data.prompt_token_ids(by_hand, tokenizer))
    assert prompt.startswith("<|im_start|>user\nIs this movie review positive or negative?")
    assert prompt.endswith(f"Review: {kept}<|im_end|>\n<|im_start|>assistant\n")


def test_choices_must_start_differently(tokenizer) -> None:
    with pytest.raises(UserError, match="share a first token"):
        data.choice_token_ids(("positive", "positively"), tokenizer)
    plain = data.Example(prompt="x", completion=" a")
    with pytest.raises(UserError, match="same non-empty choices"):
        data.score_choices(tiny_llama(len(tokenizer)), tokenizer, [plain])


@pytest.mark.integration
def test_smollm2_tokenizer_masks_and_choice_tokens() -> None:
    """With the real SmolLM2 tokenizer (ChatML), the masked pieces tokenise exactly like the
    whole rendered text, and the sentiment answers are single, distinct tokens."""
    from transformers import AutoTokenizer

    from lorakit.models import resolve_model

    smol = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    smol.pad_token = smol.eos_token
    assert data.choice_token_ids(data.SENTIMENT_LABELS, smol) == [16185, 17728]
    chats = data.load_examples("rotten-tomatoes", split="train")[:200]
    plains = data.load_examples("rotten-tomatoes", split="train", style="plain")[:200]
    # the tokens scored (the first learnt answer token, per example) are the bare words' first
    # tokens, and the scored prompts what the earlier code scored (text shortened inside the
    # template, then the last max_length tokens): classify's results on SmolLM2 are unchanged
    plain_ids = [ids(smol, " positive")[0], ids(smol, " negative")[0]]
    assert plain_ids == [2731, 3524]
    for examples, expected in ((chats, [16185, 17728]), (plains, plain_ids)):
        for example in examples:
            assert data.choice_token_ids(example.choices, smol, example) == expected
            for max_length in (256, 64):
                earlier = data.prompt_token_ids(data.fit_example(example, smol, max_length), smol)
                assert data.prompt_token_ids(example, smol, max_length) == earlier[-max_length:]
    for chat, plain in zip(chats, plains, strict=True):
        input_ids, labels, _ = data.tokenize_example(chat, smol, max_length=10_000)
        whole = smol.apply_chat_template(list(chat.messages), tokenize=False)
        assert input_ids == ids(smol, whole)
        learnt = [token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE]
        assert smol.decode(learnt) == chat.answer + "<|im_end|>"
        input_ids, labels, _ = data.tokenize_example(plain, smol, max_length=10_000)
        assert input_ids == [*ids(smol, plain.prompt + plain.completion), smol.eos_token_id]


# A DeepSeek-LLM-style chat template: the template writes "Assistant: " before the assistant's
# content, so training learns " negative" (with its space), not the bare word "negative".
SPACE_BEFORE_ANSWER_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class _PutsAllMassOn(torch.nn.Module):
    """Stands in for a perfectly trained model: every position predicts ``token``."""

    def __init__(self, token: int, vocab_size: int) -> None:
        super().__init__()
        self.token, self.vocab_size = token, vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        from types import SimpleNamespace

        logits = torch.full((*input_ids.shape, self.vocab_size), -30.0)
        logits[..., self.token] = 0.0
        return SimpleNamespace(logits=logits)


def _first_learnt(example: data.Example, tokenizer) -> int:
    input_ids, labels, _ = data.tokenize_example(example, tokenizer, 10_000)
    return next(token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE)


def test_choice_tokens_are_the_first_tokens_training_learns() -> None:
    """With a template that writes text right before the answer, classify reads the token that
    training learns first (" negative"), not the bare word's first token ("negative")."""
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = SPACE_BEFORE_ANSWER_TEMPLATE
    examples = [
        chat_classification_example(text, label, data.SENTIMENT_LABELS, data.SENTIMENT_INSTRUCTION)
        for text, label in (("a dull, lifeless mess", 1), ("a warm, funny film", 0))
    ]
    learnt = [_first_learnt(example, tokenizer) for example in examples[::-1]]  # pos, neg
    assert learnt == [ids(tokenizer, " positive")[0], ids(tokenizer, " negative")[0]]
    assert learnt != [ids(tokenizer, "positive")[0], ids(tokenizer, "negative")[0]]
    trained_on_negative = _PutsAllMassOn(learnt[1], len(tokenizer))
    result = data.classify(trained_on_negative, tokenizer, examples[:1])
    assert result.predictions == [1] and result.accuracy == 1.0
    assert result.log_probs[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    for example in examples:
        assert data.choice_token_ids(example.choices, tokenizer, example) == learnt
    # plain examples: the completion " negative" is the learnt segment, as before
    plain = plain_classification_example(
        "a dull, lifeless mess", 1, data.SENTIMENT_LABELS, data.SENTIMENT_TEMPLATE
    )
    assert data.choice_token_ids(plain.choices, tokenizer, plain) == learnt
    with pytest.raises(UserError, match="share a first token"):
        data.choice_token_ids(("positive", "positively"), tokenizer, examples[0])


def test_fewer_than_two_choices_are_refused(tokenizer) -> None:
    """One choice: every model would score 100%; refused with a message saying what to do."""
    one = chat_classification_example("fine", 0, ("positive",), data.SENTIMENT_INSTRUCTION)
    with pytest.raises(UserError, match=r"only one choice \['positive'\].*at least two"):
        data.score_choices(tiny_llama(len(tokenizer)), tokenizer, [one])
    with pytest.raises(UserError, match=r"only one choice \['positive'\].*label_words"):
        data.choice_token_ids(one.choices, tokenizer)


def test_truncation_cuts_a_trailing_turn_before_the_prompt(tokenizer) -> None:
    """A chat ending with a (long) user turn: the tokens after the answer go first, so the
    prompt stays and every answer token is learnt."""
    messages = (
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Thanks! " + "the quick brown fox " * 20},
    )
    full_ids, full_labels, _ = data.tokenize_example(
        data.Example(messages=messages), tokenizer, 10_000
    )
    learnt = [k for k, label in enumerate(full_labels) if label != IGNORE]
    answer_start, answer_end = learnt[0], learnt[-1] + 1
    assert tokenizer.decode(full_ids[answer_start:answer_end]) == "Paris.<|im_end|>"
    example = data.Example(messages=messages)
    for max_length in (answer_end, answer_end + 5):  # prompt + answer fit: only the tail is cut
        input_ids, labels, truncated = data.tokenize_example(example, tokenizer, max_length)
        assert truncated and input_ids == full_ids[:max_length]
        assert labels == full_labels[:max_length]
    max_length = answer_end - 4  # not even prompt + answer fit: tail cut, then the left
    input_ids, labels, truncated = data.tokenize_example(example, tokenizer, max_length)
    assert truncated and input_ids == full_ids[answer_end - max_length : answer_end]
    assert labels == full_labels[answer_end - max_length : answer_end]
    targets = [label for label in labels[1:] if label != IGNORE]  # what the shifted loss sees
    assert tokenizer.decode(targets) == "Paris.<|im_end|>"


def test_a_long_answer_keeps_one_token_before_it(tokenizer) -> None:
    """An answer longer than max_length: one prompt token stays, so the first answer token is
    still predicted (at position 0 it would never be learnt)."""
    example = data.Example(prompt="Q:", completion=" the quick brown fox jumps over")
    full_ids, _, _ = data.tokenize_example(example, tokenizer, 1000)
    prompt_length = len(ids(tokenizer, "Q:"))
    input_ids, labels, truncated = data.tokenize_example(example, tokenizer, 4)
    assert truncated
    assert input_ids == full_ids[prompt_length - 1 : prompt_length + 3]
    assert labels == [IGNORE, *full_ids[prompt_length : prompt_length + 3]]


def bos_tokenizer():
    """The tiny tokenizer adding a BOS (``<|endoftext|>``) to every text, as Llama's does; its
    chat template writes the BOS too, as Llama's and Mistral's do."""
    from tokenizers import processors

    tokenizer = tiny_tokenizer.build()
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tokenizer.chat_template = "{{ bos_token }}" + tiny_tokenizer.CHATML_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer("hi")["input_ids"][0] == bos != tokenizer("hi")["input_ids"][1]
    return tokenizer


def test_left_truncation_keeps_the_bos() -> None:
    tokenizer = bos_tokenizer()
    bos = tokenizer.bos_token_id
    plain = data.Example(prompt="Review: a warm, funny and moving film. " * 6, completion=" fine")
    chat = data.Example(
        messages=(
            {"role": "user", "content": "Review: a warm, funny and moving film. " * 6},
            {"role": "assistant", "content": "fine"},
        )
    )
    model = tiny_llama(len(tokenizer))
    for example in (plain, chat):
        full_ids, full_labels, _ = data.tokenize_example(example, tokenizer, 10_000)
        answer_end = max(k for k, label in enumerate(full_labels) if label != IGNORE) + 1
        assert full_ids[0] == bos and answer_end > 20
        input_ids, labels, truncated = data.tokenize_example(example, tokenizer, 16)
        assert truncated and input_ids[0] == bos
        assert input_ids == [bos, *full_ids[answer_end - 15 : answer_end]]
        assert labels == [IGNORE, *full_labels[answer_end - 15 : answer_end]]
        # scored on the same BOS-led prompt (the other choice is not longer: the same cut)
        other = "x" if example.is_chat else " x"
        classified = dataclasses.replace(example, choices=(example.answer, other), label=0)
        assert data.tokenize_example(classified, tokenizer, 16)[0] == input_ids
        scored = data.score_choices(model, tokenizer, [classified], max_length=16)
        first = next(k for k, label in enumerate(labels) if label != IGNORE)
        with torch.no_grad():
            logits = model(torch.tensor([input_ids[:first]])).logits[0, -1].double()
        choice = _first_learnt(example, tokenizer)
        expected = torch.log_softmax(logits, -1)[choice].item()
        assert scored[0, 0].item() == pytest.approx(expected, abs=1e-5)


def test_scoring_uses_the_prompt_training_keeps_when_the_template_does_not_fit(
    tokenizer,
) -> None:
    """The instruction alone is longer than max_length: tokens are cut from the left, and the
    scored prompt is exactly the training prompt, the same for every label (the cut is
    measured with the longest choice, as fit_example measures it)."""
    instruction = "Is this movie review positive or negative? Answer with one word. " * 4
    words = ("fine", "very bad indeed")
    assert len(ids(tokenizer, words[1])) > len(ids(tokenizer, words[0]))
    model = tiny_llama(len(tokenizer))
    for build in (chat_classification_example, plain_classification_example):
        examples = [build("fine", label, words, instruction + "{text}") for label in (0, 1)]
        max_length = 30
        assert len(data.prompt_token_ids(examples[0], tokenizer)) > max_length
        prompts = []
        for example in examples:
            input_ids, labels, truncated = data.tokenize_example(example, tokenizer, max_length)
            first = next(k for k, label in enumerate(labels) if label != IGNORE)
            assert truncated and len(input_ids) <= max_length
            prompts.append(input_ids[:first])
        scores = data.score_choices(model, tokenizer, examples, max_length=max_length)
        choice_ids = [_first_learnt(example, tokenizer) for example in examples]
        for row, prompt in enumerate(prompts):  # each scored on its own training prompt
            with torch.no_grad():
                logits = model(torch.tensor([prompt])).logits[0, -1].double()
            expected = torch.log_softmax(logits, -1)[choice_ids]
            torch.testing.assert_close(scores[row].double(), expected, atol=1e-5, rtol=1e-5)
        assert prompts[0] == prompts[1]  # which is the same for either label
        assert data.prompt_token_ids(examples[1], tokenizer, max_length) == prompts[0]


def test_the_scored_prompt_does_not_depend_on_the_label_when_only_the_long_choice_overflows():
    """A text whose template does not fit with the longest choice: with the short label the
    whole example fit, with the long one it was cut; the scored prompt gave the label away.
    Both labels now get the prompt the longest choice leaves room for."""
    from lorakit.data.tokenize import prompt_token_ids, tokenize_example

    tokenizer = tiny_tokenizer.build()
    words = ["fine", "the quick brown fox jumps over the lazy dog"]
    template = (
        "Is this movie review positive or negative? Answer with one word. Review: {text} Sentiment:"
    )
    for max_length in (45, 50, 60, 72):
        prompts = [
            prompt_token_ids(
                plain_classification_example("fun", label, words, template), tokenizer, max_length
            )
            for label in (0, 1)
        ]
        assert prompts[0] == prompts[1], max_length
        longest = plain_classification_example("fun", 1, words, template)
        input_ids, _, _ = tokenize_example(longest, tokenizer, max_length)
        assert len(input_ids) <= max_length
