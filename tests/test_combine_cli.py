"""``lorakit combine``: the files equal the Python API's result, bad input is one line and
exit 2 with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.combining import METHODS
from lorakit.commands import combine as command
from tests.tiny_models import llama, randomize_adapters


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine_cli")
    for name, config, seed in (
        ("a", lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 3),
        ("b", lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"]), 4),
    ):
        model = llama()
        lorakit.inject(model, config)
        randomize_adapters(model, seed=seed, std=0.2)
        lorakit.save_adapter(model, root / name)
    return root / "a", root / "b"


def test_cli_methods_are_the_library_methods():
    assert command.METHODS == METHODS


def test_ties_from_the_command_line_equals_the_python_result(adapter_dirs, tmp_path, capsys):
    dir_a, dir_b = adapter_dirs
    output = tmp_path / "out"
    arguments = [str(dir_a), str(dir_b), "--weights", "0.7", "0.3", "--method", "ties"]
    arguments += ["--rank", "3", "--density", "0.5", "--output", str(output), "--json"]
    assert main(["combine", *arguments]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ties" and report["density"] == 0.5 and report["rank"] == 3
    assert {m["rank"] for m in report["modules"]} == {3}
    assert all(0.0 < m["energy_kept"] <= 1.0 for m in report["modules"])
    expected = lorakit.combine([dir_a, dir_b], [0.7, 0.3], method="ties", rank=3, density=0.5)
    saved = lorakit.read_adapter(output)
    assert saved.config.r == 3 and saved.config.lora_alpha == 3
    for name, (lora_A, lora_B) in expected.factors.items():
        assert torch.equal(saved.tensors[f"base_model.model.{name}.lora_A.weight"], lora_A)
        assert torch.equal(saved.tensors[f"base_model.model.{name}.lora_B.weight"], lora_B)
    assert len(saved.tensors) == 2 * 6  # q, v, o in 2 layers


def test_default_is_cat_with_weights_one_and_a_table(adapter_dirs, tmp_path, capsys):
    dir_a, dir_b = adapter_dirs
    assert main(["combine", str(dir_a), str(dir_b), "--output", str(tmp_path / "cat")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.v_proj" in out and "method cat: 6 modules" in out
    config = lorakit.read_adapter(tmp_path / "cat").config
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 6  # 4 + 2
    assert config.rank_for("model.layers.0.self_attn.o_proj") == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "1"], "2 adapters but 1 --weights"),
        (["--method", "ties"], "needs density"),
        (["--method", "svd", "--rank", "0"], "rank=0"),
        (["--method", "svd", "--density", "0.3"], "density is for"),
        (["--method", "linear"], "invalid choice"),
        (["--weights", "1", "x"], "invalid float value"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    adapter_dirs, tmp_path, capsys, extra, message
):
    dir_a, dir_b = adapter_dirs
    output = tmp_path / "never"
    code = main(["combine", str(dir_a), str(dir_b), *extra, "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert message in error and len(error.splitlines()) == 1
    assert not output.exists()


def test_missing_adapter_and_file_output_are_refused(adapter_dirs, tmp_path, capsys):
    dir_a, _ = adapter_dirs
    assert (
        main(["combine", str(dir_a), str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["combine", str(dir_a), str(dir_a), "--output", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_output_replaces_an_earlier_adapter_atomically(adapter_dirs, tmp_path, capsys):
    """Writing over an earlier result (asked with --overwrite; refused without it, the earlier
    files untouched) leaves exactly the new files, no temporaries."""
    dir_a, dir_b = adapter_dirs
    output = tmp_path / "out"
    assert main(["combine", str(dir_a), str(dir_b), "--output", str(output)]) == 0
    first = (output / "adapter_model.safetensors").read_bytes()
    arguments = ["--method", "svd", "--rank", "2", "--output", str(output)]
    assert main(["combine", str(dir_a), str(dir_b), *arguments]) == 2
    assert "holds an adapter" in capsys.readouterr().err
    assert (output / "adapter_model.safetensors").read_bytes() == first
    assert main(["combine", str(dir_a), str(dir_b), *arguments, "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in output.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert lorakit.read_adapter(output).config.r == 2
