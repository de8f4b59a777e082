"""Review round 28, benchmarks: the QLoRA inference contenders as bitsandbytes and PEFT run them
by default (its CPU repack on), the FSDP memory benchmark's results file, and the training-RSS
table's unit (MiB)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def _tiny_float_base():
    """The quick Llama of the benchmarks, MLP 128 wide (bitsandbytes' CPU repack needs every
    in_features a multiple of its 64-block)."""
    import common

    config = common.smollm2_config(2, quick=True)
    config.intermediate_size = 128
    return common.base_model(config)


@pytest.mark.usefixtures("benchmarks_on_path")
def test_to_4bit_keeps_bitsandbytes_default_repack_when_asked_and_peft_matches_lorakit():
    import bench_quantized as bq

    float_base, avx = _tiny_float_base(), bq.cpu_has_avx512_bf16()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    kept, default = (
        bq.to_4bit(copy.deepcopy(float_base)),
        bq.to_4bit(copy.deepcopy(float_base), keep_storage=False),
    )
    ours = bq.adapted(lambda: bq.to_4bit(copy.deepcopy(float_base)).train(), "lorakit").eval()
    theirs = bq.adapted(
        lambda: bq.to_4bit(copy.deepcopy(float_base), keep_storage=False).train(), "peft"
    ).eval()
    with torch.no_grad():
        base_kept, base_default = kept.eval()(ids).logits, default.eval()(ids).logits
        logits_ours, logits_theirs = ours(ids).logits, theirs(ids).logits
    assert not bq.repacked(kept) and not bq.repacked(ours)  # lorakit keeps the stored bytes
    assert bq.repacked(default) is avx and bq.repacked(theirs) is avx  # bitsandbytes' default
    # the repacked kernel computes the same NF4 product (bfloat16 inside; measured 2.3e-3)
    assert (base_default - base_kept).abs().max() < 1e-2
    assert (logits_ours - base_kept).abs().max() > 0.05  # B non-zero: measured 0.146
    # PEFT on the bitsandbytes-default base holds the same adapter: the same logits (2.2e-3)
    assert (logits_theirs - logits_ours).abs().max() < 1e-2


@pytest.mark.slow
def test_quantized_quick_reports_lorakit_against_bnb_default_base_and_peft(
    monkeypatch, tmp_path, benchmarks_on_path
):
    import bench_quantized as bq

    out = tmp_path / "quantized.json"
    argv = ["bench_quantized", "--quick", "--repeats", "2", "--threads", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bq.main()
    payload, avx = json.loads(out.read_text()), bq.cpu_has_avx512_bf16()
    settings, medians = payload["settings"], payload["medians"]
    assert settings["cpu_avx512_bf16"] is avx
    expected_repack = {
        "lorakit": False,
        "base": False,
        "base (bnb default)": avx,
        "peft (bnb default)": avx,
    }
    if avx:  # lorakit with --bnb-cpu-kernel, where bitsandbytes has that kernel
        expected_repack["lorakit kernel"] = True
    assert settings["inference_repack"] == expected_repack
    ratios, new = payload["ratios"], payload["inference_ratios_bnb_default"]
    for phase in ("decode", "prefill"):
        for name in ("lorakit", "base", "base (bnb default)", "peft (bnb default)"):
            assert len(payload["seconds"][f"{phase} {name}"]) == 2
        # the existing ratio (repack off on both sides) is kept, the new ones beside it
        lorakit = medians[f"{phase} lorakit"]
        assert ratios[f"{phase} unmerged / base"] == lorakit / medians[f"{phase} base"]
        assert new[f"{phase} unmerged / base (bnb default)"] == pytest.approx(
            lorakit / medians[f"{phase} base (bnb default)"]
        )
        assert new[f"{phase} lorakit / peft (bnb default)"] == pytest.approx(
            lorakit / medians[f"{phase} peft (bnb default)"]
        )
        if avx:
            kernel = medians[f"{phase} lorakit kernel"]
            assert new[f"{phase} kernel / peft (bnb default)"] == pytest.approx(
                kernel / medians[f"{phase} peft (bnb default)"]
            )


FAKE_RANK = {
    "frozen": 269_000_000,
    "trainable": 4_880_000,
    "rss_before_load": 308_000_000,
    "rss_after_load": 400_000_000,
    "rss_after_training": 790_000_000,
    "peak_rss": 1_216_000_000,
}


@pytest.mark.usefixtures("benchmarks_on_path")
def test_fsdp_memory_writes_its_per_rank_numbers_to_a_results_file(monkeypatch, tmp_path, capsys):
    import bench_fsdp_memory as bench

    def measure(args, strategy):  # torchrun's workers, replaced: rank r holds r + 1 times more
        scale = 2 if strategy == "ddp" else 1
        return [{k: v * scale * (rank + 1) for k, v in FAKE_RANK.items()} for rank in range(3)]

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)  # the default: results/fsdp_memory.json
    monkeypatch.setattr(sys, "argv", ["bench_fsdp_memory", "--processes", "3", "--steps", "4"])
    bench.main()
    payload = json.loads((tmp_path / "fsdp_memory.json").read_text())
    assert (payload["model"], payload["processes"], payload["steps"]) == (
        "smollm2-135m-instruct",
        3,
        4,
    )
    assert payload["ranks"] == {"ddp": measure(None, "ddp"), "fsdp": measure(None, "fsdp")}
    assert payload["settings"]["unit"] == "bytes"
    assert payload["settings"]["lora"]["r"] == 8
    assert payload["settings"]["worker_environment"]["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert payload["versions"]["torch"] == torch.__version__
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[2 + 3][:4] == ["fsdp", "0", "269.0", "4.88"]  # the table still prints, in MB
    out = tmp_path / "elsewhere.json"
    monkeypatch.setattr(sys, "argv", ["bench_fsdp_memory", "--out", str(out)])
    bench.main()
    assert json.loads(out.read_text())["processes"] == 2


@pytest.mark.usefixtures("benchmarks_on_path")
def test_training_rss_table_is_in_mib_and_the_json_says_bytes(monkeypatch, tmp_path, capsys):
    import bench_training_rss as bench

    mib = 2**20

    def run_child(base, args):  # the child process, replaced: whole MiB values
        loaded = (100 if base == "float32" else 50) * mib
        return {
            "base": base,
            "loaded": loaded,
            "training_peak": loaded + 30 * mib,
            "training_added": 30 * mib,
        }

    monkeypatch.setattr(bench, "run_child", run_child)
    out = tmp_path / "rss.json"
    argv = ["--quick", "--steps", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    header = "| base | after loading (MiB) | training peak (MiB) | added by training (MiB) |"
    assert header in printed and "(MB)" not in printed
    assert "| float32 | 100 | 130 | 30 |" in printed and "| bfloat16 | 50 | 80 | 30 |" in printed
    payload = json.loads(out.read_text())
    assert payload["settings"]["unit"] == "bytes"
    assert payload["rows"][0]["loaded"] == 100 * mib  # the JSON keeps bytes, under its old keys
