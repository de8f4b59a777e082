"""Review fix (round 35) of ``lorakit train --strategy fsdp``: a quantized base is refused
before any process loads the model.

FSDP cannot shard a quantized base yet. ``--quantization`` with ``--strategy fsdp`` was refused
only by ``fsdp.check_shardable``, after every process had loaded and quantized the whole model
and the run had announced itself (and left ``train_settings.json`` in its output); ``lorakit
plan`` refuses it up front. Now ``lorakit train`` does too, with the same message.
"""

from __future__ import annotations

import pytest

import lorakit.models
from lorakit import cli


@pytest.mark.parametrize("quantization", ["nf4", "gguf"])
def test_fsdp_with_quantization_is_refused_before_loading(
    tmp_path, monkeypatch, capsys, model_dir, quantization
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, so check_strategy lets fsdp by

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(lorakit.models, "load_model", loaded)
    output = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", "rotten-tomatoes", "--steps", "1"]
    argv += ["--strategy", "fsdp", "--quantization", quantization, "--output", str(output)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    expected = f"--strategy fsdp cannot shard a quantized base yet (--quantization {quantization})"
    assert expected in err and err.count("\n") == 1, err
    assert not output.exists()
