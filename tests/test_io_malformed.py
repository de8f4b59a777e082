"""Malformed adapter files (``tests/bad_adapters.py``): ``load_adapter`` raises an
``AdapterFileError`` naming the problem and leaves the model unchanged; ``lorakit inspect`` exits
2 with one line and no traceback; keys and shapes are checked before any tensor data is read."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError
from lorakit.io import load_adapter, save_adapter
from lorakit.io import read as read_module
from tests import tiny_models
from tests.bad_adapters import CASES, Case, write_header_only_file

CONFIG = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.3)
    directory = tmp_path_factory.mktemp("good") / "adapter"
    save_adapter(model, directory)
    return directory


def broken(good_adapter, tmp_path, case: Case):
    directory = tmp_path / "broken"
    shutil.copytree(good_adapter, directory)
    case.edit(directory)
    return directory


def _state(model):
    return [(n, type(m)) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_load_adapter_refuses_with_an_adapter_file_error(good_adapter, tmp_path, case) -> None:
    directory = broken(good_adapter, tmp_path, case)
    model = tiny_models.llama()
    modules, tensors = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterFileError) as caught:
            load_adapter(model, directory)
    message = str(caught.value)
    assert all(word in message for word in case.words), message
    after_modules, after_tensors = _state(model)
    assert after_modules == modules and after_tensors.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], after_tensors[k]) for k in tensors)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_inspect_exits_2_with_one_line(good_adapter, tmp_path, case, capsys) -> None:
    directory = broken(good_adapter, tmp_path, case)
    code = main(["inspect", str(directory)])
    out, err = capsys.readouterr()
    if not case.inspect_refuses:  # found in data or header parts inspect does not read
        assert code == 0 and "rank:" in out and err == ""
        return
    assert code == 2, out
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(word in err for word in case.words), err


def test_over_long_and_looping_directories_are_adapter_file_errors(tmp_path, capsys) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for path, words in [
        (tmp_path / ("x" * 5000), "File name too long"),
        (loop, "does not exist"),
        (loop / "inner", "does not exist"),
    ]:
        with pytest.raises(AdapterFileError, match=words):
            load_adapter(tiny_models.llama(), path)
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and len(err) < 1000


def test_wrong_keys_are_refused_from_the_header_without_reading_the_data(
    tmp_path, monkeypatch
) -> None:
    """A 1 GiB file (sparse: no disk used) whose keys fit no module: refused before any byte of
    tensor data is read."""
    prefix = "base_model.model.model.layers.0.self_attn.wrong_proj"
    size = write_header_only_file(
        tmp_path / "adapter_model.safetensors",
        {f"{prefix}.lora_A.weight": (2**15, 2**12), f"{prefix}.lora_B.weight": (64, 2)},
        {"format": "pt"},
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    reads = []
    monkeypatch.setattr(read_module, "read_safetensors", lambda path: reads.append(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterFileError, match="lacks tensors its config implies"):
            load_adapter(tiny_models.llama(), tmp_path)
    assert size > 2**29 and reads == []


def test_a_file_that_fits_is_read_once_after_the_checks(good_adapter, monkeypatch) -> None:
    reads = []
    real = read_module.read_safetensors
    monkeypatch.setattr(
        read_module, "read_safetensors", lambda path: reads.append(path) or real(path)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_adapter(tiny_models.llama(), good_adapter)
    assert reads == [good_adapter / "adapter_model.safetensors"]
    assert lorakit.adapter_configs(model)["default"].r == 2
