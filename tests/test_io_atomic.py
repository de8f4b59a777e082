"""Atomic saves: a saving process killed (SIGKILL) at random moments never leaves a broken or
half-written adapter; what is in the directory always loads, consistently (config and tensors
of one save)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import peft
import pytest
import torch

import lorakit
from lorakit.io import atomic, load_adapter, save_adapter

SRC = str(Path(__file__).resolve().parents[1] / "src")
TARGETS = ["0", "1", "2", "3"]

# Saves forever, alternating versions v = 1, 2: every LoRA tensor filled with v, lora_alpha 8 * v.
_SAVER = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
import lorakit
from lorakit.io import save_adapter
torch.manual_seed(0)  # the same base weights as _toy_model()
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
lorakit.inject(model, lorakit.LoraConfig(r=32, lora_alpha=8, target_modules=["0", "1", "2", "3"]))
print("ready", flush=True)
state = lorakit.adapter_configs(model)
for i in range(10**9):
    version = 1 + i % 2
    state["default"] = state["default"].replace(lora_alpha=8 * version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(float(version))
    save_adapter(model, sys.argv[1])
"""


def _toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])


def _loaded_version(directory: Path) -> float:
    """Load the adapter; check that all tensors and lora_alpha belong to the same save."""
    model = _toy_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(model, directory)
    values = {
        float(p.unique().item())
        for _, layer in lorakit.state.lora_layers(model)
        for p in layer.adapter_parameters("default")
    }
    assert len(values) == 1, values
    (version,) = values
    assert lorakit.adapter_configs(model)["default"].lora_alpha == 8 * version
    return version


@pytest.mark.slow
def test_killed_saver_never_leaves_a_broken_adapter(tmp_path) -> None:
    previous = lorakit.inject(
        _toy_model(), lorakit.LoraConfig(r=32, lora_alpha=4, target_modules=TARGETS)
    )
    with torch.no_grad():
        for _, layer in lorakit.state.lora_layers(previous):
            for parameter in layer.adapter_parameters("default"):
                parameter.fill_(0.5)
    save_adapter(previous, tmp_path)
    assert _loaded_version(tmp_path) == 0.5
    rng = random.Random(1234)
    seen = set()
    for _trial in range(6):
        saver = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(tmp_path), SRC],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert saver.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            os.kill(saver.pid, signal.SIGKILL)
            saver.wait(timeout=30)
        seen.add(_loaded_version(tmp_path))
    assert seen <= {0.5, 1.0, 2.0}
    assert seen & {1.0, 2.0}  # the saver did overwrite the adapter at least once


def _filled(value: float, alpha: float) -> torch.nn.Module:
    model = lorakit.inject(
        _toy_model(), lorakit.LoraConfig(r=32, lora_alpha=alpha, target_modules=TARGETS)
    )
    with torch.no_grad():
        for _, layer in lorakit.state.lora_layers(model):
            for parameter in layer.adapter_parameters("default"):
                parameter.fill_(value)
    return model


def test_a_crash_between_the_two_renames_still_loads_one_consistent_save(
    tmp_path, monkeypatch
) -> None:
    """The old config is moved out first, then the weights renamed in, the config last: a
    crash before the config follows leaves the new weights and no adapter_config.json. PEFT
    then refuses the directory (before, it paired the new weights with the old config); lorakit
    loads it with the config saved inside the weights, saying so."""
    save_adapter(_filled(1.0, alpha=8), tmp_path)
    renames, real_replace = [], os.replace

    def crash_on_the_config(source, destination):
        renames.append(Path(destination).name)
        if Path(destination).name == "adapter_config.json" and len(renames) > 1:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", crash_on_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_filled(2.0, alpha=16), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(ValueError):  # peft: no config, no load (not the old alpha)
        peft.PeftModel.from_pretrained(_toy_model(), tmp_path)
    with pytest.warns(UserWarning, match="adapter_config.json is missing"):
        load_adapter(model := _toy_model(), tmp_path)
    assert lorakit.adapter_configs(model)["default"].lora_alpha == 16  # new, as the tensors
    assert {
        p.item()
        for _, layer in lorakit.state.lora_layers(model)
        for p in layer.adapter_parameters("default")[0].unique()
    } == {2.0}
    save_adapter(_filled(2.0, alpha=16), tmp_path)  # saving again completes it
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_write_bytes_replaces_atomically_and_cleans_stale_temporaries(tmp_path) -> None:
    target = tmp_path / "file.bin"
    stale = tmp_path / ".file.bin.abc123.tmp"
    stale.write_bytes(b"left by a killed writer")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    atomic.write_bytes(target, b"one")
    atomic.write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_write_with_fsyncs_renames_and_cleans_up(tmp_path, monkeypatch) -> None:
    """A writer that opens a path itself (the GGUF writer): the file appears whole, after an
    fsync of its data; a failing writer leaves neither the target nor a temporary file; a killed
    writer's stale temporary is removed by the next write."""
    target = tmp_path / "model.gguf"
    stale = tmp_path / ".model.gguf.0badc0de.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 600, time.time() - 600))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )

    def failing(path: str) -> None:
        Path(path).write_bytes(b"part")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.write_with(target, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # stale one gone, no new one
    atomic.write_with(target, lambda path: Path(path).write_bytes(b"GGUF whole"))
    assert target.read_bytes() == b"GGUF whole"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert any(Path(p).name.startswith(".model.gguf.") for p in synced)  # data, then the dir
    assert str(tmp_path) in synced


def test_a_file_system_refusal_is_one_line_naming_the_path(capsys, monkeypatch) -> None:
    import errno

    import lorakit.plan
    from lorakit import cli

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", "/data/out/.x.gguf.ab.tmp")

    monkeypatch.setattr(lorakit.plan, "plan", refuse)
    assert cli.main(["plan", "llama-2-7b"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "lorakit: error: Operation not permitted: /data/out/.x.gguf.ab.tmp; check the "
        "permissions (and immutable flags), or choose another path\n"
    )
