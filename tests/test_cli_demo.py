"""``lorakit demo`` end to end on a tiny random Llama directory (the real run uses SmolLM2)."""

from __future__ import annotations

import json

from lorakit import cli
from tests.test_cli_train import model_dir  # noqa: F401  (the tiny model fixture)


def test_demo_runs_and_writes_its_summary(tmp_path, capsys, model_dir):  # noqa: F811
    from lorakit.demo import DemoSettings, run_demo

    settings = DemoSettings(output=str(tmp_path / "demo"), model=str(model_dir), steps=2,
                            eval_size=8, max_length=64, progress=False)  # fmt: skip
    summary = run_demo(settings)
    out = capsys.readouterr().out
    assert "zero-shot accuracy" in out and "predictions identical" in out
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written["held_out_reviews"] == 8 and written["training_reviews"] == 16
    assert written["merged_predictions_agree"] == 8  # merging keeps every prediction
    assert written["merged_max_abs_logprob_difference"] < 1e-4
    assert 0.0 <= written["zero_shot_accuracy"] <= 1.0 and written["steps"] == 2
    adapter = tmp_path / "demo" / "adapter" / "adapter_model.safetensors"
    assert written["adapter_bytes"] == adapter.stat().st_size
    assert (tmp_path / "demo" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "demo" / "summary.txt").read_text().splitlines()[0].startswith("Rotten")
    assert summary["fine_tuned_accuracy"] == written["fine_tuned_accuracy"]


def test_demo_bad_flag_is_one_line(capsys):
    assert cli.main(["demo", "--eval-size", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
