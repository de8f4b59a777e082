"""``save_merged_model``: a plain transformers directory, loadable WITHOUT lorakit, same outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.io import save_merged_model
from tests import tiny_models

# Runs in a fresh interpreter where importing lorakit is impossible: only transformers loads it.
_LOAD_WITHOUT_LORAKIT = """
import json, sys
sys.modules["lorakit"] = None  # any 'import lorakit' now raises ImportError
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
assert not any(name.startswith("lorakit.") for name in sys.modules)
print(json.dumps(logits.flatten().tolist()))
"""


@pytest.mark.slow
def test_merged_model_loads_with_plain_transformers_and_gives_the_same_outputs(tmp_path) -> None:
    model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    tiny_models.randomize_adapters(model, std=0.3)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        base = tiny_models.llama()(ids).logits
    (tmp_path / "merged").mkdir()
    stale = tmp_path / "merged" / "model-00001-of-00002.safetensors"  # from an earlier save
    stale.write_bytes(b"old shard")
    (tmp_path / "merged" / "notes.txt").write_text("the user's file")
    merged = save_merged_model(model, tmp_path / "merged")
    assert not stale.exists() and (tmp_path / "merged" / "notes.txt").exists()
    assert not list(lorakit.state.lora_layers(merged))
    assert (tmp_path / "merged" / "config.json").is_file()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_LORAKIT,
            str(tmp_path / "merged"),
            json.dumps(ids.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])).reshape(
        expected.shape
    )
    assert (loaded - expected).abs().max().item() <= 1e-5
    assert (expected - base).abs().max().item() > 1e-3
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the staging directory is gone


def test_merged_files_reach_the_disk_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    import os

    from lorakit.io import atomic

    events = []
    real_sync, real_replace = atomic.sync, os.replace
    monkeypatch.setattr(atomic, "sync", lambda p: events.append(("sync", str(p))) or real_sync(p))
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b)
    )
    model = lorakit.inject(tiny_models.llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    save_merged_model(model, tmp_path / "merged")
    replaced = [path for kind, path in events if kind == "replace"]
    assert any(path.endswith("model.safetensors") for path in replaced)
    for path in replaced:  # each file synced before any rename
        assert events.index(("sync", path)) < events.index(("replace", replaced[0]))
    assert events[-1] == ("sync", str(tmp_path / "merged"))  # then the directory
