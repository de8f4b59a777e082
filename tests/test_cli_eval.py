"""``lorakit eval`` reports: the truncation warning and count, and one-class CSV data refused."""

from __future__ import annotations

import json

from tests.cli_runs import run_cli


def test_eval_warns_about_truncated_examples_and_counts_them(capsys, tmp_path, model_dir):
    path = tmp_path / "long.jsonl"
    long_prompt = "the quick brown fox jumps over the lazy dog " * 2
    records = [{"prompt": long_prompt, "completion": " hello how are you"}] * 3
    records.append({"prompt": "hello", "completion": " fine"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    code, out, err = run_cli(
        capsys, "eval", "--model", model_dir, "--data", path, "--max-length", 16
    )
    assert code == 0
    assert (
        "lorakit: warning: 3 of 4 evaluation examples are longer than --max-length 16 tokens "
        "and were shortened; raise --max-length to evaluate them whole"
    ) in err.splitlines()
    report = json.loads(out)
    assert report["examples"] == 4 and report["truncated"] == 3
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--data", path)
    assert code == 0 and json.loads(out)["truncated"] == 0
    assert "warning" not in err


def test_eval_refuses_a_csv_with_one_label(capsys, tmp_path, model_dir):
    path = tmp_path / "one_class.csv"
    path.write_text("text,label\nwarm funny film,positive\na dull mess,positive\n")
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--data", path)
    assert code == 2 and out == ""
    assert err.startswith(f"lorakit: error: {path}: every row has the label 'positive'")
