"""Data and evaluation fixes: text without spaces is cut by characters when too long; `lorakit
eval` scores whole answers where answer words share a first token; empty prompts spread over the splits; the chat-template error names the CLI flag."""

from __future__ import annotations

import json

import pytest

from lorakit import data
from lorakit.cli import main
from lorakit.data.chat import require_chat_template
from lorakit.errors import UserError
from tests import tiny_tokenizer

REVIEW = "电影很好看演员很出色" * 2  # a review without any space (one "word")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer.build()


def test_text_without_spaces_keeps_its_longest_prefix_that_fits(tokenizer, tmp_path):
    path = tmp_path / "cjk.csv"
    path.write_text(f"text,label\n{REVIEW},positive\n很无聊,negative\n", encoding="utf-8")
    example = data.load_examples(path)[0]
    full = len(data.tokenize_example(example, tokenizer, 10_000)[0])
    limit = full - 3
    ids, _, _ = data.tokenize_example(example, tokenizer, limit)
    assert len(ids) <= limit
    assert len(ids) >= limit - 4  # the review's characters, not the empty text (full - 60)
    prompt = tokenizer.decode(data.prompt_token_ids(example, tokenizer, limit))
    assert REVIEW[:10] in prompt  # most of the review is still scored
    # English words are still cut at word ends
    words = " ".join(["good"] * 40)
    path.write_text(f"text,label\n{words},positive\nbad,negative\n", encoding="utf-8")
    example = data.load_examples(path)[0]
    limit = len(data.tokenize_example(example, tokenizer, 10_000)[0]) - 3
    kept = data.prompt_token_ids(example, tokenizer, limit)
    assert tokenizer.decode(kept).rstrip().endswith("Label:")
    assert "goo\n" not in tokenizer.decode(kept) and "good" in tokenizer.decode(kept)


def test_eval_scores_whole_answers_when_labels_share_a_first_token(model_dir, tmp_path, capsys):
    """' 0' and ' 1' are 'Ġ' + a digit for byte-level BPE: their first tokens are the same, so
    eval scores the whole answers (it used to refuse such labels)."""
    path = tmp_path / "numbers.csv"
    path.write_text("text,label\ngreat film,1\nbad film,0\nfine film,1\n", encoding="utf-8")
    assert main(["eval", "--model", str(model_dir), "--data", str(path), "--split", "all"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy_kind"] == "choice scoring of whole answers"
    assert report["examples"] == 3 and report["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_whole_answer_scores_are_the_answers_log_likelihood(model_dir, tmp_path):
    """Each choice scores sum_t log P(a[t] | prompt, a[:t]) over the tokens training learns
    for it (the answer and its EOS), batched or not, against an unpadded float64 forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = tmp_path / "numbers.csv"
    rows = "".join(f"review number {i} {'good ' * i},{i % 2}\n" for i in range(5))
    path.write_text("text,label\n" + rows, encoding="utf-8")
    examples = data.load_examples(path, split="all")
    assert data.whole_answers_needed(examples, tokenizer)
    with pytest.raises(UserError, match="share a first token"):
        data.score_choices(model, tokenizer, examples, whole_answers=False)
    scores = data.score_choices(model, tokenizer, examples, batch_size=3)
    double = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    for i, example in enumerate(examples):
        prompt = data.prompt_token_ids(example, tokenizer)
        for j, choice in enumerate(example.choices):
            answer = data.tokenize.answer_token_ids(example, tokenizer, choice)
            assert answer[-1] == tokenizer.eos_token_id and len(answer) >= 2
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                log_probs = double(ids).logits[0].log_softmax(-1)
            expected = sum(log_probs[len(prompt) - 1 + t, token] for t, token in enumerate(answer))
            assert abs(scores[i, j].item() - expected.item()) < 1e-4
    result = data.classify(model, tokenizer, examples, batch_size=2)
    assert result.whole_answers and result.predictions == scores.argmax(-1).tolist()


def test_empty_prompts_spread_over_the_splits(tmp_path):
    path = tmp_path / "empty.jsonl"
    rows = [{"prompt": "", "completion": f" answer number {i}"} for i in range(200)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sizes = {
        split: len(data.load_examples(path, split=split))
        for split in ("train", "validation", "test")
    }
    assert sum(sizes.values()) == 200
    assert sizes["validation"] > 5 and sizes["test"] > 5 and sizes["train"] > 120


def test_the_chat_template_error_names_the_flag():
    tokenizer = tiny_tokenizer.build()
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="--style plain"):
        require_chat_template(tokenizer, "rotten-tomatoes[21]")


@pytest.mark.parametrize(
    "start",
    [
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": "S"}],
        [
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": " "},
        ],
    ],
    ids=["empty-user", "system-only", "earlier-reply"],
)
def test_chats_without_a_question_spread_over_the_splits(tmp_path, start):
    path = tmp_path / "chats.jsonl"
    lines = []
    for i in range(200):
        messages = [*start, {"role": "assistant", "content": f"answer number {i}"}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    path.write_text("".join(lines))
    sizes = {s: len(data.load_examples(path, split=s)) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 200 and sizes["validation"] > 5 and sizes["test"] > 5


def test_the_chat_template_advice_names_style_for_csv_and_built_ins_only():
    tokenizer = tiny_tokenizer.build()
    tokenizer.chat_template = None
    with pytest.raises(UserError, match=r"for CSV or built-in data, style='plain': --style plain"):
        require_chat_template(tokenizer, "chat.jsonl:1")


def cut_reviews(tokenizer, tmp_path, review: str, below: int):
    """The review text ``fit_example`` keeps of a CSV row holding ``review``, at each
    ``--max-length`` from ``below`` tokens under the row's full length to one under it."""
    path = tmp_path / "r.csv"
    path.write_text(f"text,label\n{review},positive\nno,negative\n", encoding="utf-8")
    example = data.load_examples(path)[0]
    full = len(data.tokenize_example(example, tokenizer, 10_000)[0])
    return [data.fit_example(example, tokenizer, limit).text for limit in range(full - below, full)]


@pytest.mark.parametrize(
    "review",
    [
        "好" * 30 + "👨\u200d👩\u200d👧" * 12,  # a family emoji: three people joined by U+200D
        "看" * 30 + "🇯🇵" * 20,  # flags: pairs of regional indicators
        "e\u0301" * 60,  # e + a combining acute accent
    ],
    ids=["family-emoji", "flags", "combining-accent"],
)
def test_the_character_cut_never_splits_what_a_reader_sees_as_one_character(
    tokenizer, tmp_path, review
):
    for kept in cut_reviews(tokenizer, tmp_path, review, below=12):
        assert review.startswith(kept) and len(kept) < len(review)
        assert not kept.endswith("\u200d") and review[len(kept)] not in ("\u0301", "\u200d")
        assert sum(0x1F1E6 <= ord(c) <= 0x1F1FF for c in kept) % 2 == 0


@pytest.mark.parametrize(
    "review",
    ["ภาพยนตร์เรื่องนี้สนุกมาก" * 3, "किताबअच्छीहै" * 6, "1\ufe0f\u20e3" * 15],
    ids=["thai", "devanagari", "keycaps"],
)
def test_the_character_cut_keeps_marks_with_their_letters(tokenizer, tmp_path, review):
    import unicodedata

    for kept in cut_reviews(tokenizer, tmp_path, review, below=40):
        if kept and len(kept) < len(review):
            assert not unicodedata.category(review[len(kept)]).startswith("M")
            assert review[len(kept)] != "\ufe0f"
