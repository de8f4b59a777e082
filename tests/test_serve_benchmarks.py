"""The serving benchmarks run end to end in --quick mode and write their JSON (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def _import(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return __import__(name)


def test_mixed_adapters_quick(tmp_path, capsys):
    out = tmp_path / "mixed.json"
    assert _import("bench_mixed_adapters").main(["--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["versions"]["peft"] and payload["workload"] == 3
    kinds = {(row["phase"], row["choice"]) for row in payload["rows"]}
    assert ("decode", "distinct") in kinds and ("prefill", "zipf") in kinds
    for row in payload["rows"]:
        assert set(row["raw"]) == {"base", "single", "mixed", "peft"}
        assert row["mixed_over_single"] > 0
    assert "mixed/single" in capsys.readouterr().out


def test_serving_quick(tmp_path, capsys):
    out = tmp_path / "serving.json"
    assert _import("bench_serving").main(["--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload["medians"]) == {"1", "4"}
    for medians in payload["medians"].values():
        assert medians["tokens_per_s"] > 0 and medians["ttft_p50"] <= medians["ttft_p99"]
    assert payload["peft_switching"]["tokens_per_s"] > 0
    assert "vs peft" in capsys.readouterr().out


def test_serving_scale_quick(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert _import("bench_serving_scale").main(["--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["medians"]["zipf"]["errors"] == 0 and payload["soak"]["error_count"] == 0
    assert payload["raw"]["zipf"][0]["cold_requests"] > 0  # cold adapters were exercised
    assert payload["soak"]["churn_cycles"] > 0 and payload["zipf_over_one"] > 0
    assert payload["memory"][-1]["resident_bytes"] <= payload["bank"]["bytes"]
    assert "zipf / one adapter" in capsys.readouterr().out


def test_serving_beside_llamacpp_quick(tmp_path, capsys):
    out = tmp_path / "serving_llamacpp.json"
    assert _import("bench_serving_llamacpp").main(["--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    summary = payload["summary"]
    assert summary["one_stream_tokens_per_s"] > 0 and summary["ttft_s"] > 0
    assert summary["concurrent_tokens_per_s"] > 0 and 0 < summary["fraction_of_peak"] < 1
    assert set(payload["raw"]) >= {"one", "ttft", "mixed", "single", "hf_one"}
    assert "llama.cpp not run" in payload["note"]
    assert "mixed_adapter_overhead" in capsys.readouterr().out


def test_serving_beside_llamacpp_one_stream_only_on_int8_rows_quick(tmp_path):
    out = tmp_path / "serving_llamacpp_one.json"
    argv = ["--quick", "--one-stream-only", "--quantization", "int8-rows", "--out", str(out)]
    assert _import("bench_serving_llamacpp").main(argv) == 0
    payload = json.loads(out.read_text())
    assert set(payload["raw"]) == {"one", "hf_one"}  # no concurrent or TTFT rounds
    summary = payload["summary"]
    ratio = summary["one_stream_tokens_per_s"] / summary["transformers_one_stream_tokens_per_s"]
    assert summary["one_stream_vs_transformers"] == pytest.approx(ratio)  # one round: the ratio
    assert payload["settings"]["quantization"] == "int8-rows"


def test_serving_beside_llamacpp_on_int4_groups_reports_how_far_its_logits_are(tmp_path):
    out = tmp_path / "serving_llamacpp_int4.json"
    argv = ["--quick", "--one-stream-only", "--quantization", "int4-groups", "--out", str(out)]
    assert _import("bench_serving_llamacpp").main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert 0 < summary["quantized_max_logit_error"] < 0.5  # 4-bit: close, not equal
    assert 0 < summary["quantized_argmax_agreement"] <= 1
