"""``lorakit analyze`` and ``lorakit extract`` on tiny models saved to temporary directories; the
extracted adapter is checked through lorakit's loader and through the real peft package."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorakit.cli import main
from tests import tiny_models
from tests.tiny_models import UPDATE_RANKS, fine_tuned


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    base = tiny_models.llama()
    tuned = fine_tuned(base, noise=1e-5)
    root = tmp_path_factory.mktemp("models")
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", base, tuned


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_a_full_fine_tune_as_json_with_plots(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, base, tuned = model_dirs
    argv = ["analyze", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--json"]
    code, out, _ = _run(capsys, [*argv, "--plots", str(tmp_path)])
    assert code == 0
    report = json.loads(out)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert len(layers) == 6
    for name, layer in layers.items():
        assert layer["rank_99"] == UPDATE_RANKS[layer["module_type"].rsplit(".", 1)[-1]]
        delta = (
            tuned.get_submodule(name).weight.detach().double()
            - base.get_submodule(name).weight.detach().double()
        )
        expected = torch.linalg.svdvals(delta)
        assert layer["singular_values"][:3] == pytest.approx(expected[:3].tolist(), rel=1e-5)
    advice = {a["module_type"].rsplit(".", 1)[-1]: a["rank"] for a in report["advice"]["0.99"]}
    assert advice == UPDATE_RANKS
    for name in ("spectra.png", "ranks.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_extract_then_load_reproduces_the_fine_tune(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, base, tuned = model_dirs
    output = tmp_path / "adapter"
    argv = ["extract", "--base", str(base_dir), "--finetuned", str(tuned_dir)]
    code, out, _ = _run(capsys, [*argv, "--output", str(output), "--energy", "0.999", "--json"])
    assert code == 0
    report = json.loads(out)
    assert {layer["rank"] for layer in report["layers"]} == set(UPDATE_RANKS.values())
    assert report["parameters"] == sum(l["rank"] * sum(l["shape"]) for l in report["layers"])
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["r"] == 4 and len(saved["rank_pattern"]) == 4

    from lorakit.io import load_adapter

    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = tuned(ids).logits
        change = (expected - base(ids).logits).norm()
        model = load_adapter(copy.deepcopy(base), output)
        got = model(ids).logits
    assert float((got - expected).norm() / change) < 10 * report["max_relative_error"] + 1e-4

    from peft import PeftModel

    with torch.no_grad():
        oracle = PeftModel.from_pretrained(copy.deepcopy(base), str(output))(ids).logits
    torch.testing.assert_close(oracle, got, rtol=1e-5, atol=1e-5)

    code, out, _ = _run(capsys, ["analyze", str(output), "--json"])
    assert code == 0
    layers = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    name = "model.layers.0.self_attn.v_proj"
    delta = (
        tuned.get_submodule(name).weight.detach().double()
        - base.get_submodule(name).weight.detach().double()
    )
    top = torch.linalg.svdvals(delta)[:4].tolist()
    assert layers[name]["singular_values"] == pytest.approx(top, rel=1e-5)
    assert layers[name]["max_rank"] == 4


def test_readable_table_and_user_errors(model_dirs, capsys, tmp_path):
    base_dir, tuned_dir, _, _ = model_dirs
    code, out, _ = _run(capsys, ["analyze", "--base", str(base_dir), "--finetuned", str(tuned_dir)])
    assert code == 0 and "r99" in out and "advised rank at 0.9" in out
    assert "model.layers.1.mlp.down_proj" in out
    code, _, err = _run(capsys, ["analyze"])
    assert code == 2 and "ADAPTER_DIR" in err
    code, _, err = _run(capsys, ["analyze", "--base", str(base_dir)])
    assert code == 2 and "--finetuned" in err
    argv = ["extract", "--base", str(base_dir), "--finetuned", str(base_dir)]
    code, _, err = _run(capsys, [*argv, "--output", str(tmp_path / "x"), "--rank", "2"])
    assert code == 2 and "no linear layer differs" in err
    code, _, err = _run(capsys, [*argv, "--output", str(tmp_path / "x"), "--energy", "1.5"])
    assert code == 2 and "--energy" in err
