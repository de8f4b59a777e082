"""Each benchmark runs once in ``--quick`` mode (tiny model) and writes its JSON. Values checked
are deterministic ones (bytes saved for backward, merge errors, logit agreement), never timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow  # each runs a whole benchmark script


def _run(monkeypatch, tmp_path: Path, module_name: str, *extra: str) -> dict:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = __import__(module_name)
    out = tmp_path / f"{module_name}.json"
    argv = [module_name, "--quick", "--repeats", "1", "--threads", "1", "--out", str(out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    payload = json.loads(out.read_text())
    assert payload["versions"]["torch"] and payload["versions"]["peft"]
    return payload


def test_training_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_training")
    (result,) = payload["results"]
    assert result["dropout"] == 0.05
    assert set(result["times_s"]) == {"lorakit", "peft", "lorakit-plain", "frozen"}
    saved = result["saved_bytes"]
    assert saved["lorakit"] < 0.75 * saved["peft"]  # no dropout copies, x kept once
    assert saved["lorakit"] < saved["lorakit-plain"]


def test_inference_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_inference")
    for result in payload["results"].values():
        change = result["max_abs_logit_change"]
        assert change["base"] == 0.0 and change["lorakit"] > 1e-3  # adapters do something
        for name in ("peft", "lorakit-merged", "peft-merged"):
            assert change[name] == pytest.approx(change["lorakit"], rel=1e-4)


def test_merge_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_merge")
    for errors in payload["max_abs_error"].values():
        assert errors["lorakit"] == {"1": 0.0, "100": 0.0}
    assert payload["max_abs_error"]["bf16"]["peft"]["100"] > 0.0


def test_loading_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_loading")
    assert set(payload["times_s"]) == {"1st", "5th"}
    for times in payload["times_s"].values():
        assert all(len(values) == 1 and values[0] > 0 for values in times.values())


def test_dropout_cost_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_dropout_cost")
    assert set(payload["times_s"]) == {"frozen", "dropout 0", "dropout 0.05"}
    assert all(len(times) == 1 and times[0] > 0 for times in payload["times_s"].values())


def test_quantized_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_quantized")
    assert set(payload["ratios"]) == {
        "training lorakit / peft",
        "training lorakit / frozen",
        "memory 4-bit / bf16 (lorakit)",
        "memory lorakit / peft (4-bit)",
        "decode unmerged / base",
        "prefill unmerged / base",
    }
    memory = payload["memory_bytes"]
    # the 4-bit projections store 0.5159 bytes a weight, bf16 2: the weights shrink
    assert memory["lorakit 4-bit"]["weights"] < memory["lorakit bf16"]["weights"]
    # the same adapter state, and lorakit keeps no more for backward than PEFT on the same base
    assert memory["lorakit 4-bit"]["optimizer"] == memory["peft 4-bit"]["optimizer"] > 0
    assert memory["lorakit 4-bit"]["saved"] <= memory["peft 4-bit"]["saved"]


def test_dora_benchmark(monkeypatch, tmp_path):
    """``bench_dora.py --quick``: lorakit's DoRA computes PEFT's logits and keeps fewer bytes for
    backward than PEFT's DoRA (docs/dora.md), LoRA fewer still (no row norms)."""
    payload = _run(monkeypatch, tmp_path, "bench_dora")
    assert set(payload["training"]) == {"dropout=0.0", "dropout=0.05"}
    for result in payload["training"].values():
        assert set(result["times_s"]) == {"lora", "dora", "peft-dora"}
        saved = result["saved_bytes"]
        assert 0 < saved["lora"] < saved["dora"] < saved["peft-dora"]
    assert set(payload["inference"]) == {"prefill 4x128", "decode 1x1", "decode 32x1"}
    for result in payload["inference"].values():
        assert result["max_abs_logit_diff_dora_vs_peft"] < 1e-5  # fp32: the same function
    assert set(payload["serving"]) == {"mixed decode 32x1", "mixed 32x16"}
    for result in payload["serving"].values():
        assert set(result["times_s"]) == {"lora", "half-dora"}


def test_layer_dominated_shapes(monkeypatch):
    """``--shape layers`` / ``1b`` (issue 16): Llamas whose layers carry the compute."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    small, large = common.model_config("layers", 8, False), common.model_config("1b", 8, False)
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (384, 1024, 4)
    assert (large.hidden_size, large.intermediate_size, large.num_hidden_layers) == (2048, 8192, 2)
    assert small.vocab_size == large.vocab_size == 2000
    assert common.model_config("smollm2", 3, False).num_hidden_layers == 3


def test_training_rss_benchmark(monkeypatch, tmp_path):
    payload = _run(monkeypatch, tmp_path, "bench_training_rss", "--steps", "1")
    rows = {row["base"]: row for row in payload["rows"]}
    assert set(rows) == {"float32", "bfloat16"}  # --quick: the float bases, each in a child
    for row in rows.values():
        assert "error" not in row, row
        assert 0 < row["loaded"] <= row["training_peak"]  # the high-water mark of the steps
        assert row["final_loss"] > 0
