"""Review fix (round 35) of ``lorakit demo``: a ``--max-length`` too short for the template.

Below the length of its prompt template and answer (51 tokens with SmolLM2's tokenizer), every
prompt was cut from the left and lost its system prompt and instruction, silently, while the
docs say the instruction and the answer are never cut. The demo now refuses such a length
before scoring anything, naming the length that holds the template.
"""

from __future__ import annotations

import pytest

import lorakit.demo
from lorakit import data
from lorakit.data.fit import template_length
from lorakit.errors import UserError
from tests import tiny_tokenizer
from tests.cli_runs import demo_settings


def _tokenizer():
    tokenizer = tiny_tokenizer.build()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def test_template_length_is_the_least_length_that_keeps_the_prompts_start():
    """Independent of ``template_length``: scan the lengths at which a long review's shortened
    prompt still begins with its full prompt's first 12 tokens (the system prompt)."""
    tokenizer = _tokenizer()
    reviews = data.load_examples("rotten-tomatoes", "test")
    example = max(reviews[:50], key=lambda review: len(review.text))
    full = data.prompt_token_ids(example, tokenizer)
    keeps_start = [
        length
        for length in range(20, 120)
        if data.prompt_token_ids(example, tokenizer, length)[:12] == full[:12]
    ]
    assert len(full) > 120  # long enough to be shortened at every length scanned
    assert keeps_start == list(range(keeps_start[0], 120))  # from one length on, always
    assert template_length(example, tokenizer) == keeps_start[0]


def test_the_demo_refuses_a_max_length_below_the_template_before_scoring(
    tmp_path, monkeypatch, model_dir
):
    needed = template_length(data.load_examples("rotten-tomatoes", "test")[0], _tokenizer())

    def scored(*args, **kwargs):
        raise AssertionError("scored before the refusal")

    monkeypatch.setattr(lorakit.demo, "_accuracy", scored)
    settings = demo_settings(tmp_path / "demo", model_dir, max_length=needed - 1)
    with pytest.raises(UserError, match=rf"--max-length {needed - 1} cannot hold .*\({needed} "):
        lorakit.demo.run_demo(settings)
    monkeypatch.setattr(lorakit.demo, "_accuracy", lambda *a: (_ for _ in ()).throw(OSError))
    with pytest.raises(OSError):  # at the template's length the demo goes on to score
        lorakit.demo.run_demo(demo_settings(tmp_path / "demo2", model_dir, max_length=needed))


def test_a_refused_rerun_keeps_the_previous_demos_results(tmp_path, monkeypatch, model_dir):
    """The refusal comes before the output is claimed: an earlier demo's summary and
    predictions stay (a regression review found them deleted by the refused rerun), and
    before the model loads."""
    import lorakit.models

    output = tmp_path / "demo"
    output.mkdir()
    (output / lorakit.demo.DEMO_MARKER).write_text("an earlier demo\n")
    kept = {"summary.json": "{}", "summary.txt": "earlier", "predictions.jsonl": "{}\n"}
    for name, text in kept.items():
        (output / name).write_text(text)

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(lorakit.models, "load_model", loaded)
    with pytest.raises(UserError, match="cannot hold"):
        lorakit.demo.run_demo(demo_settings(output, model_dir, max_length=20))
    assert {name: (output / name).read_text() for name in kept} == kept
