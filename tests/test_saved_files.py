"""What saved files look like to other users and tools (issue 12, item 13): adapters and merged
models get the permissions of any new file (0666 & ~umask), not mkstemp's 0600; ``lorakit
train`` writes ``task_type: CAUSAL_LM`` (peft's ``AutoPeftModelForCausalLM`` needs it) and the
model spec the user gave as ``base_model_name_or_path`` (a built-in's name, not the cache path;
a local directory as given); ``lorakit extract`` records its ``--base`` the same way."""

from __future__ import annotations

import copy
import json
import os
import stat

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit import LoraConfig, cli
from lorakit.io import atomic
from tests import tiny_models, tiny_tokenizer
from tests.cli_runs import train_cli


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o022)``), restoring it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _modes(directory) -> dict[str, int]:
    return {
        path.name: stat.S_IMODE(path.stat().st_mode)
        for path in directory.iterdir()
        if path.is_file()
    }


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_adapter_and_merged_model_have_the_umask_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    model = lorakit.inject(tiny_models.llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    lorakit.save_merged_model(model, tmp_path / "merged")
    atomic.write_text(tmp_path / "note.txt", "x")
    adapter_modes = _modes(tmp_path / "adapter")
    merged_modes = _modes(tmp_path / "merged")
    assert set(adapter_modes) == {"adapter_config.json", "adapter_model.safetensors"}
    assert "model.safetensors" in merged_modes and "config.json" in merged_modes
    assert set(adapter_modes.values()) == set(merged_modes.values()) == {expected}
    assert _modes(tmp_path) == {"note.txt": expected}


def test_atomic_writes_leave_no_probe_or_temporary_files(tmp_path):
    atomic.write_files({tmp_path / "a": b"1", tmp_path / "b": b"2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"


def _train(model_spec, data, output) -> dict:
    code = train_cli(
        model_spec,
        data,
        output,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--r",
        "2",
        "--target-modules",
        "q_proj,v_proj",
    )
    assert code == 0
    return json.loads((output / "adapter" / "adapter_config.json").read_text())


def test_train_writes_causal_lm_and_the_directory_as_given(tmp_path, monkeypatch, model_dir, jsonl):
    config = _train(model_dir, jsonl, tmp_path / "run")
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")
    ours = lorakit.load_adapter(
        AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "run" / "adapter"
    )
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    ids = tiny_models.input_ids(vocab=len(tiny_tokenizer.build()))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits)


def test_train_records_a_home_relative_model_with_its_tilde_expanded(
    tmp_path, monkeypatch, model_dir, jsonl
):
    """``--model=~/base`` (bash leaves ``~`` after ``=`` alone; a config file's ``model:
    ~/base`` too): training worked (lorakit expands it) but the file recorded "~/base", which
    peft and transformers take for a Hub id and cannot open."""
    monkeypatch.setenv("HOME", str(model_dir.parent))
    config = _train(f"~/{model_dir.name}", jsonl, tmp_path / "run")
    assert config["base_model_name_or_path"] == str(model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")
    assert isinstance(theirs, peft.PeftModelForCausalLM)


def _fake_builtin(monkeypatch, model_dir, name: str = "tiny-builtin") -> str:
    """Register ``model_dir`` as a built-in model called ``name`` (no GGUF conversion)."""
    import lorakit.model_specs
    import lorakit.models

    builtin = lorakit.models.BuiltinModel(
        name=name,
        package="tiny_builtin",
        install="-",
        relative_path=model_dir.name,
        is_gguf=False,
        is_encoder=False,
        description="a test model",
    )
    monkeypatch.setitem(lorakit.models.BUILTIN_MODELS, name, builtin)
    monkeypatch.setattr(lorakit.model_specs, "_package_folder", lambda _builtin: model_dir.parent)
    assert lorakit.models.resolve_model(name) == model_dir
    return name


def test_train_on_a_builtin_records_its_name_not_the_cache_path(
    tmp_path, monkeypatch, model_dir, jsonl
):
    name = _fake_builtin(monkeypatch, model_dir)
    config = _train(name, jsonl, tmp_path / "run")
    assert config["base_model_name_or_path"] == name
    assert config["task_type"] == "CAUSAL_LM"


def test_extract_records_the_base_spec_as_given(tmp_path, monkeypatch, model_dir, capsys):
    tuned = copy.deepcopy(AutoModelForCausalLM.from_pretrained(model_dir))
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    tuned.save_pretrained(tmp_path / "tuned")
    name = _fake_builtin(monkeypatch, model_dir)
    for base, output in (
        (name, tmp_path / "from-builtin"),
        (str(model_dir), tmp_path / "from-dir"),
    ):
        argv = [
            "extract",
            "--base",
            base,
            "--finetuned",
            str(tmp_path / "tuned"),
            "--output",
            str(output),
            "--rank",
            "1",
            "--json",
        ]
        assert cli.main(argv) == 0
        config = json.loads((output / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base
        assert config["task_type"] == "CAUSAL_LM"
    capsys.readouterr()
