"""``lorakit demo`` end to end on a tiny random Llama directory (the real run uses SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit import cli, data
from lorakit.errors import UserError
from tests.cli_runs import demo_settings


def _settings(tmp_path, model_dir, **overrides):
    return demo_settings(tmp_path / "demo", model_dir, **overrides)


def _predict_one_at_a_time(model, tokenizer, examples, max_length) -> list[int]:
    """Each review's choice by an unpadded forward of its (shortened) prompt, by hand."""
    positive, negative = (
        tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative")
    )
    predictions = []
    for example in examples:
        prompt = data.prompt_token_ids(data.fit_example(example, tokenizer, max_length), tokenizer)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        predictions.append(0 if logits[positive] > logits[negative] else 1)
    return predictions


@pytest.mark.slow
def test_demo_runs_and_writes_its_summary(tmp_path, capsys, model_dir):
    from lorakit.demo import run_demo
    from lorakit.io import load_adapter

    summary = run_demo(_settings(tmp_path, model_dir))
    out = capsys.readouterr().out
    assert "zero-shot accuracy" in out and "8/8 predictions identical" in out
    demo = tmp_path / "demo"
    assert json.loads((demo / "summary.json").read_text()) == summary
    # predictions: the first 8 test reviews with their dataset labels
    rows = [json.loads(line) for line in (demo / "predictions.jsonl").read_text().splitlines()]
    held_out = data.load_examples("rotten-tomatoes", "test", style="chat")[:8]
    assert [(r["review"], r["label"]) for r in rows] == [(e.source, e.label) for e in held_out]
    # the accuracies are the counts of right predictions, and the predictions are the models'
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert [r["zero_shot"] for r in rows] == _predict_one_at_a_time(base, tokenizer, held_out, 64)
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), demo / "adapter")
    tuned = _predict_one_at_a_time(adapted.eval(), tokenizer, held_out, 64)
    assert [r["fine_tuned"] for r in rows] == [r["merged"] for r in rows] == tuned
    for key, column in (
        ("zero_shot_accuracy", "zero_shot"),
        ("fine_tuned_accuracy", "fine_tuned"),
        ("merged_accuracy", "merged"),
    ):
        assert summary[key] == sum(r[column] == r["label"] for r in rows) / 8
    assert summary["merged_predictions_agree"] == 8
    assert summary["merged_max_abs_logprob_difference"] < 1e-4
    # sizes and counts from the model itself: r (in + out) per projection, 2 layers
    config = base.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv, hidden, inner = (
        config.num_key_value_heads * head_dim,
        config.hidden_size,
        config.intermediate_size,
    )
    per_layer = 16 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inner) * 3)
    assert summary["trainable_parameters"] == 2 * per_layer == 29_696
    assert summary["base_parameters"] == sum(p.numel() for p in base.parameters())
    adapter_file = demo / "adapter" / "adapter_model.safetensors"
    assert summary["adapter_bytes"] == adapter_file.stat().st_size
    assert summary["base_model_bytes"] == (model_dir / "model.safetensors").stat().st_size
    assert summary["adapter_percent_of_base"] == pytest.approx(
        100 * summary["adapter_bytes"] / summary["base_model_bytes"]
    )
    losses = [json.loads(line)["loss"] for line in (demo / "metrics.jsonl").open()]
    assert summary["steps"] == 2 == len(losses) and summary["final_train_loss"] == losses[-1]
    assert summary["held_out_reviews"] == 8 and summary["training_reviews"] == 16
    assert (demo / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (demo / "summary.txt").read_text().splitlines()[0].startswith("Rotten")


@pytest.mark.slow
def test_a_merged_model_that_disagrees_fails_the_demo(tmp_path, monkeypatch, model_dir):
    """Force a mismatch: after the real merge, swap the output rows of "positive" and
    "negative", so the merged model predicts the other answer on every review."""
    from lorakit.demo import run_demo

    real_merge = lorakit.merge_and_unload
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pair = [
        tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative")
    ]

    def merge_then_swap(model):
        merged = real_merge(model)
        with torch.no_grad():
            merged.lm_head.weight[pair] = merged.lm_head.weight[pair[::-1]].clone()
        return merged

    monkeypatch.setattr(lorakit, "merge_and_unload", merge_then_swap)
    with pytest.raises(UserError, match=r"merge check failed: .* on 4 of 4 held-out reviews"):
        run_demo(_settings(tmp_path, model_dir, steps=1, eval_size=4))
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["merged_predictions_agree"] == 0  # the evidence stays on disk


def test_only_near_ties_may_flip_in_the_merge_check():
    """Margins of 1e-6 and 0.5 between the two answers, both flipped by the merge: the first
    is within the merge's rounding (max difference 1e-5), the second is a real disagreement;
    a large max difference (a broken merge) excuses nothing beyond 1e-4."""
    from lorakit.demo import _near_ties

    log_probs = torch.tensor([[-0.693147, -0.693148], [-0.2, -0.7], [-0.3, -1.5]])
    predictions, merged = [0, 0, 0], [1, 1, 0]
    assert _near_ties(log_probs, predictions, merged, max_difference=1e-5) == 1
    assert _near_ties(log_probs, predictions, merged, max_difference=5.0) == 1
    assert _near_ties(log_probs, predictions, merged, max_difference=1e-8) == 0


def test_demo_bad_flag_is_one_line(capsys):
    assert cli.main(["demo", "--eval-size", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_same_seed_same_result_whether_or_not_the_model_was_in_the_cache(
    tmp_path, capsys, tiny_builtin_model
):
    """The first run converts the built-in model (drawing random numbers), the second reads it
    from the cache: the same accuracies, losses and adapter weights."""
    from lorakit.demo import run_demo
    from lorakit.models import DEFAULT_MODEL

    summaries, adapters = [], []
    for run in ("converted", "cached"):
        settings = _settings(tmp_path / run, DEFAULT_MODEL, steps=3, lr=1e-2)
        summaries.append(run_demo(settings))
        adapters.append(
            load_file(tmp_path / run / "demo" / "adapter" / "adapter_model.safetensors")
        )
    assert len(tiny_builtin_model) == 1  # converted once, then read from the cache
    numbers = (
        "zero_shot_accuracy",
        "fine_tuned_accuracy",
        "final_train_loss",
        "trainable_parameters",
    )
    first, second = ({key: summary[key] for key in numbers} for summary in summaries)
    assert first == second and first["trainable_parameters"] == 29_696
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 28
    for key, tensor in adapters[0].items():
        assert torch.equal(adapters[1][key], tensor), key


def test_the_summary_gives_sizes_in_binary_units():
    from lorakit.demo import summary_lines

    summary = {
        "held_out_reviews": 200,
        "model": "m",
        "zero_shot_accuracy": 0.675,
        "steps": 60,
        "training_reviews": 480,
        "fine_tuned_accuracy": 0.805,
        "accuracy_gain_points": 13.0,
        "trainable_parameters": 4_884_480,
        "adapter_bytes": 19_696_256,
        "base_model_bytes": 538_090_408,
        "adapter_percent_of_base": 3.66,
        "merged_predictions_agree": 200,
        "merged_max_abs_logprob_difference": 3e-5,
        "merged_disagreements_at_near_ties": 0,
        "adapter_dir": "a",
        "loss_curve": "c",
        "seconds": 219.0,
    }
    line = summary_lines(summary)[3]
    # the real demo's files: 19,696,256 and 538,090,408 bytes
    assert line == "  adapter: 4,884,480 parameters, 18.8 MiB vs base model 513.2 MiB (3.66%)"


def test_demo_options_are_its_settings_fields(monkeypatch, capsys):
    import lorakit.demo
    from lorakit.demo import DemoSettings

    given = []
    monkeypatch.setattr(lorakit.demo, "run_demo", given.append)
    argv = ["demo", "--steps", "5", "--no-progress", "--style", "plain", "--output", "o"]
    assert cli.main(argv) == 0
    assert given == [DemoSettings(output="o", steps=5, style="plain", progress=False)]
    assert cli.main(["demo"]) == 0 and given[1] == DemoSettings()
    assert cli.main(["demo", "--use-dora", "--steps", "3"]) == 0
    assert given[2] == DemoSettings(use_dora=True, steps=3)
    assert cli.main(["demo", "--lr", "0"]) == 2
    assert capsys.readouterr().err == "lorakit: error: --lr must be a finite number > 0, got 0.0\n"


def test_an_output_holding_a_training_run_is_refused_before_the_model_loads(tmp_path, capsys):
    """The demo replaces its adapter, checkpoints and metrics: it writes only into an empty
    directory or a previous demo's, never over a ``lorakit train`` run."""
    from lorakit.demo_files import DEMO_MARKER, claim_output

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "train_settings.json").write_text("{}")
    code = cli.main(["demo", "--output", str(run), "--no-progress"])
    assert code == 2
    captured = capsys.readouterr()
    assert (
        "is not an earlier demo's output (it has no demo_run.txt) and holds checkpoints, train_settings.json"
        in captured.err
    )
    assert "[demo] loading" not in captured.out
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "train_settings.json"]
    fresh = tmp_path / "fresh"
    claim_output(fresh)
    (fresh / "adapter").mkdir()
    claim_output(fresh)  # a previous demo's directory: taken again
    assert (fresh / DEMO_MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim_output(tmp_path / "file")


def test_a_directory_with_someone_elses_summary_json_is_refused_and_kept(tmp_path, model_dir):
    """Only a demo's own summary.json (from before the marker file) claims a directory: a
    ``lorakit train`` run holding a user's summary.json and predictions is left whole."""
    from lorakit.demo import run_demo

    output = tmp_path / "demo"
    output.mkdir()
    files = {
        "summary.json": '{"accuracy": 0.9, "notes": "mine"}\n',
        "predictions.jsonl": '{"id": 1}\n',
        "train_settings.json": "{}\n",
    }
    for name, text in files.items():
        (output / name).write_text(text)
    with pytest.raises(UserError, match="is not an earlier demo's output"):
        run_demo(demo_settings(output, model_dir))
    assert {path.name: path.read_text() for path in output.iterdir()} == files


def test_a_summary_json_of_a_demo_from_before_the_marker_still_claims_its_directory(
    tmp_path, monkeypatch, model_dir
):
    import lorakit.demo

    output = tmp_path / "demo"
    output.mkdir()
    old = {"zero_shot_accuracy": 0.6, "fine_tuned_accuracy": 0.7, "held_out_reviews": 8}
    (output / "summary.json").write_text(json.dumps(old | {"adapter_dir": "demo/adapter"}))
    monkeypatch.setattr(lorakit.demo, "_train", lambda *a, **k: (_ for _ in ()).throw(OSError))
    with pytest.raises(OSError):  # claimed (no UserError), then stopped before training
        lorakit.demo.run_demo(demo_settings(output, model_dir))
    assert sorted(path.name for path in output.iterdir()) == [lorakit.demo.DEMO_MARKER]
