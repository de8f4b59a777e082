"""Review fixes in reading and checking adapter files: the safetensors layout rules the real
``safetensors`` enforces (tensors tile the data area, no repeated key, no trailing bytes), JSON
integers past Python's digit limit, fingerprints that cover only some modules, and a transposed
factor named as such."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io import fingerprint, load_adapter, save_adapter
from lorakit.io.header import read_header
from lorakit.io.tensors import read_safetensors
from tests import tiny_models
from tests.bad_adapters import (
    Q_A,
    Q_B,
    WEIGHTS,
    append_bytes,
    edit_header,
    edit_metadata,
    offsets_of,
    repeat_key,
    replace_tensors,
)

CONFIG = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
Q1_A = "layers.1.self_attn.q_proj.lora_A.weight"
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.3)
    directory = tmp_path_factory.mktemp("good") / "adapter"
    save_adapter(model, directory)
    return directory


def _copy(good_adapter: Path, tmp_path: Path, edit=None) -> Path:
    directory = tmp_path / "adapter"
    shutil.copytree(good_adapter, directory)
    if edit is not None:
        edit(directory)
    return directory


def _refused(directory: Path, *words: str) -> str:
    """Load ``directory`` into a fresh tiny Llama: it must raise ``AdapterFileError`` with
    ``words`` and leave every tensor of the model as it was."""
    model = tiny_models.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterFileError) as caught:
            load_adapter(model, directory)
    message = str(caught.value)
    assert all(word in message for word in words), message
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return message


def _safetensors_refuses(directory: Path) -> None:
    """The oracle: the real safetensors refuses the file too."""
    with pytest.raises(SafetensorError):
        load_file(directory / WEIGHTS)


def test_a_good_file_reads_the_same_values_as_safetensors(good_adapter) -> None:
    expected = load_file(good_adapter / WEIGHTS)
    contents = read_safetensors(good_adapter / WEIGHTS)
    assert sorted(contents.tensors) == sorted(expected)
    assert all(torch.equal(contents.tensors[k], expected[k]) for k in expected)
    assert any(bool(t.abs().sum() > 0) for k, t in expected.items() if "lora_B" in k)


def test_two_tensors_sharing_bytes_are_refused_naming_the_key(good_adapter, tmp_path) -> None:
    directory = _copy(good_adapter, tmp_path, offsets_of(Q1_A, Q_A))
    _safetensors_refuses(directory)
    _refused(directory, Q1_A, "overlap or leave a gap")
    with pytest.raises(AdapterFileError, match="overlap or leave a gap"):
        read_header(directory / WEIGHTS)


def test_a_gap_between_tensors_is_refused(good_adapter, tmp_path) -> None:
    def move_last(entries: dict) -> None:  # the last tensor 4 bytes later: a 4-byte gap
        key = max(
            (k for k in entries if k != "__metadata__"), key=lambda k: entries[k]["data_offsets"]
        )
        start, end = entries[key]["data_offsets"]
        entries[key]["data_offsets"] = [start + 4, end + 4]

    def edit(directory: Path) -> None:
        edit_header(move_last)(directory)
        append_bytes(4)(directory)

    directory = _copy(good_adapter, tmp_path, edit)
    _safetensors_refuses(directory)
    _refused(directory, "overlap or leave a gap")


def test_a_repeated_header_key_is_refused_naming_it(good_adapter, tmp_path) -> None:
    directory = _copy(good_adapter, tmp_path, repeat_key(Q_A, Q1_A))
    _safetensors_refuses(directory)
    _refused(directory, Q_A, "appears twice")


def test_bytes_after_the_last_tensor_are_refused(good_adapter, tmp_path) -> None:
    directory = _copy(good_adapter, tmp_path, append_bytes(16))
    _safetensors_refuses(directory)
    _refused(directory, "16 bytes after the last tensor")


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process since ``_reset_peak_rss`` (or its start)."""
    try:
        text = Path("/proc/self/status").read_text()
        line = next(line for line in text.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Linux: reset VmHWM to the current RSS (elsewhere the peak only grows: a looser check)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def test_a_gigabyte_of_trailing_bytes_is_refused_without_reading_it(good_adapter, tmp_path) -> None:
    directory = _copy(good_adapter, tmp_path, append_bytes(2**30))  # sparse: no disk used
    model = tiny_models.llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _reset_peak_rss()
    start = _peak_rss_bytes()
    with pytest.raises(AdapterFileError, match=f"{2**30} bytes after the last tensor"):
        load_adapter(model, directory)
    with pytest.raises(AdapterFileError, match="bytes after the last tensor"):
        read_safetensors(directory / WEIGHTS)
    assert _peak_rss_bytes() - start < 200 * 2**20
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_json_integers_past_the_digit_limit_are_adapter_file_errors(good_adapter, tmp_path) -> None:
    huge = "9" * 5000
    header = _copy(
        good_adapter,
        tmp_path / "header",
        edit_header(lambda e: (json.dumps(e)[:-1] + f', "x": {huge}}}').encode()),
    )
    _refused(header, str(header / WEIGHTS), "not a valid safetensors file", "not JSON")
    config = _copy(good_adapter, tmp_path / "config")
    (config / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})[:-1] + f', "x": {huge}}}'
    )
    _refused(config, "adapter_config.json", "is not valid JSON")


def _fingerprint_keeping(names: list[str]):
    """An edit keeping only the fingerprints of ``names`` in the file."""

    def edit(directory: Path) -> None:
        stored = json.loads(read_header(directory / WEIGHTS).metadata[fingerprint.METADATA_KEY])
        stored["modules"] = {k: v for k, v in stored["modules"].items() if k in names}
        edit_metadata(**{fingerprint.METADATA_KEY: json.dumps(stored)})(directory)

    return edit


def _loaded_with_warnings(directory: Path, model) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, directory)
    return [str(w.message) for w in caught]


def _factors_match_file(model, directory: Path) -> None:
    """Each LoRA factor in ``model`` equals the file's (the load copied the values in)."""
    saved = load_file(directory / WEIGHTS)
    loaded = tiny_models.adapter_tensors(model, "default")
    assert sorted(loaded) == sorted(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)


def test_an_empty_fingerprint_on_another_base_warns_naming_modules(good_adapter, tmp_path) -> None:
    directory = _copy(good_adapter, tmp_path, _fingerprint_keeping([]))
    model = tiny_models.llama(seed=1)  # another base of the same shapes
    messages = [m for m in _loaded_with_warnings(directory, model) if "cannot verify" in m]
    assert len(messages) == 1, messages
    assert "does not cover 4 of its modules" in messages[0] and MODULES[0] in messages[0]
    _factors_match_file(model, directory)


def test_a_partial_fingerprint_warns_naming_only_the_uncovered(good_adapter, tmp_path) -> None:
    directory = _copy(good_adapter, tmp_path, _fingerprint_keeping(MODULES[:3]))
    model = tiny_models.llama()  # the right base: the covered modules match
    messages = [m for m in _loaded_with_warnings(directory, model) if "cannot verify" in m]
    assert len(messages) == 1 and "1 of its modules" in messages[0], messages
    assert MODULES[3] in messages[0] and MODULES[0] not in messages[0]


def test_a_normal_load_does_not_warn(good_adapter) -> None:
    model = tiny_models.llama()
    assert _loaded_with_warnings(good_adapter, model) == []
    _factors_match_file(model, good_adapter)


def test_saving_with_offloaded_base_weights_warns_and_loading_says_so(tmp_path) -> None:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.3)
    layer = model.get_submodule(MODULES[0])
    shape = layer.base_layer.weight.shape
    layer.base_layer.weight = torch.nn.Parameter(torch.empty(shape, device="meta"))
    with pytest.warns(UserWarning, match="meta device") as caught:
        save_adapter(model, tmp_path / "adapter")
    saved = [str(w.message) for w in caught if "meta device" in str(w.message)]
    assert len(saved) == 1 and MODULES[0] in saved[0] and MODULES[1] not in saved[0]
    stored = json.loads(
        read_header(tmp_path / "adapter" / WEIGHTS).metadata[fingerprint.METADATA_KEY]
    )
    assert sorted(stored["modules"]) == sorted(MODULES[1:])
    loaded = tiny_models.llama()
    messages = [m for m in _loaded_with_warnings(tmp_path / "adapter", loaded) if "verify" in m]
    assert len(messages) == 1 and MODULES[0] in messages[0], messages
    _factors_match_file(loaded, tmp_path / "adapter")


@pytest.mark.parametrize("suffix", [Q_A, Q_B])
def test_a_transposed_factor_is_named_as_such(good_adapter, tmp_path, suffix) -> None:
    directory = _copy(good_adapter, tmp_path, replace_tensors(**{suffix: lambda t: t.T}))
    message = _refused(directory, suffix, "transposed", "Re-save the adapter")
    assert "other dimensions" not in message
