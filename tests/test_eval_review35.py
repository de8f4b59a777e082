"""Review 35, `lorakit eval`: whole-answer choice scoring respects --max-length. Label words that
share a first token are scored by their whole answers after the prompt; an answer that leaves no
room for a prompt token within the limit used to be run past it (an IndexError from GPT-2's
position table; silently longer than the limit on a rotary model). It is refused instead, by the
CLI before the loss pass and by ``data.score_choices`` / ``data.classify``, naming the answer's
token count and the least limit that holds it."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit import data
from lorakit.data.scoring import check_whole_answers_fit
from lorakit.errors import UserError
from tests import tiny_tokenizer
from tests.cli_runs import run_cli

TAIL = " warm funny moving film" * 4  # a long answer: about 70 tokens with the tiny tokenizer


def _csv(path, labels, rows=4):
    """A CSV with ``rows`` short reviews labelled by turns with ``labels``."""
    lines = "".join(f"fun film,{labels[i % len(labels)]}\n" for i in range(rows))
    path.write_text("text,label\n" + lines, encoding="utf-8")
    return path


def _longest_answer(example, tokenizer) -> int:
    """Tokens of the longest whole answer training learns for ``example`` (answer + EOS)."""
    return max(
        len(data.tokenize.answer_token_ids(example, tokenizer, choice))
        for choice in example.choices
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (a learned table of 64 positions) with the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_eval_refuses_a_whole_answer_longer_than_max_length_on_gpt2(capsys, tmp_path, gpt2_dir):
    """'very good ...' and 'very bad ...' share their first token, so eval scores whole answers;
    the longest is over 64 tokens: refused in one line (exit 2) before the loss pass, where it
    used to end in an uncaught IndexError from GPT-2's position table."""
    path = _csv(tmp_path / "long.csv", [f"very good{TAIL}", f"very bad{TAIL}"])
    tokenizer = tiny_tokenizer.build()
    example = data.load_examples(path, split="all")[0]
    assert data.whole_answers_needed([example], tokenizer)
    longest = _longest_answer(example, tokenizer)
    assert longest > 64
    code, out, err = run_cli(
        capsys, "eval", "--model", gpt2_dir, "--data", path, "--max-length", 64
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"lorakit: error: --data {path}: choice ' very good warm")
    assert f"a whole answer of {longest} tokens" in err
    assert f"more than --max-length 64: give --max-length {longest + 1} or more" in err
    assert "shorten the label words" in err


def test_eval_scores_first_tokens_of_long_answers_within_max_length(capsys, tmp_path, gpt2_dir):
    """Long answers whose first tokens differ are scored by the first token (the prompt alone,
    within the limit): not refused, and the loss pass cuts them as before."""
    path = _csv(tmp_path / "distinct.csv", [f"positive{TAIL}", f"negative{TAIL}"])
    code, out, err = run_cli(
        capsys, "eval", "--model", gpt2_dir, "--data", path, "--split", "all", "--max-length", 64
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["accuracy_kind"] == "choice scoring" and report["truncated"] == 4
    assert report["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_score_choices_stays_within_max_length(tmp_path, model_dir):
    """On a rotary model nothing fails, so score_choices used to run sequences longer than
    max_length silently. Now: one token short of the least limit named, UserError before any
    forward; at it, every sequence run is within it and each score is the whole answer's
    log-likelihood after the prompt training keeps (float64 reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = _csv(tmp_path / "long.csv", [f"very good{TAIL}", f"very bad{TAIL}"], rows=3)
    examples = data.load_examples(path, split="all")
    longest = _longest_answer(examples[0], tokenizer)
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with pytest.raises(UserError) as refused:
        data.score_choices(model, tokenizer, examples, batch_size=2, max_length=longest)
    message = str(refused.value)
    assert f"of {path}:2 is a whole answer of {longest} tokens" in message
    assert f"more than max_length {longest}: give max_length {longest + 1} or more" in message
    with pytest.raises(UserError, match=f"give max_length {longest + 1} or more"):
        data.classify(model, tokenizer, examples, max_length=40)
    with pytest.raises(UserError, match="more than max_length 40"):
        check_whole_answers_fit(examples, tokenizer, 40)
    assert lengths == []  # refused before any forward
    limit = longest + 1
    scores = data.score_choices(model, tokenizer, examples, batch_size=2, max_length=limit)
    hook.remove()
    assert lengths and max(lengths) <= limit
    double = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    for i, example in enumerate(examples):
        prompt = data.prompt_token_ids(example, tokenizer, limit)
        for j, choice in enumerate(example.choices):
            answer = data.tokenize.answer_token_ids(example, tokenizer, choice)
            assert len(prompt) + len(answer) <= limit
            with torch.no_grad():
                log_probs = double(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            expected = sum(log_probs[len(prompt) - 1 + t, token] for t, token in enumerate(answer))
            assert abs(scores[i, j].item() - expected.item()) < 1e-4
