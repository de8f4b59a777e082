"""Review fixes, round 31 (b): what ``lorakit.io.adapter_dirs.adapter_directory`` says when no adapter is
found. An adapter name missing in an existing directory lists the adapters that directory holds
(no Hugging Face Hub hint, even for a relative path shaped like ``owner/name``); the Hub hint is
kept for a directory that does not exist; a file given as the directory (the
``adapter_config.json`` itself) is named as a file, with its directory to give instead."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.errors import AdapterFileError
from tests import tiny_models
from tests.cli_runs import run_cli


@pytest.fixture
def multi(tmp_path, monkeypatch):
    """The relative directory ``owner/multi`` (shaped like a Hub id) holding PEFT's "default"
    adapter (r=4) and, in ``second/``, "second" (r=2); the working directory is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    model = lorakit.get_peft_model(
        tiny_models.llama(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    model.add_adapter("second", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "owner" / "multi")
    return "owner/multi"


def test_a_missing_adapter_name_lists_the_adapters_of_the_existing_directory(multi, capsys) -> None:
    code, out, err = run_cli(capsys, "inspect", multi, "--adapter-name", "nope")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "snapshot_download" not in err and "Hugging Face" not in err
    assert err.startswith(
        "lorakit: error: no adapter 'nope' in owner/multi (owner/multi/nope does not exist); "
        "it holds 'default' (owner/multi), 'second' (owner/multi/second): ask for one of them "
        "by name (`lorakit inspect --adapter-name NAME`, 'default' being owner/multi itself"
    ), err
    code, out, _ = run_cli(capsys, "inspect", multi, "--adapter-name", "second", "--json")
    assert code == 0 and json.loads(out)["directory"] == "owner/multi/second"  # as listed
    with pytest.raises(AdapterFileError, match=r"it holds 'default' \(owner/multi\), 'second'"):
        lorakit.load_adapter(tiny_models.llama(), multi, "other", subfolder="nope")


def test_a_directory_holding_no_adapter_says_so(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "empty" / "sub").mkdir(parents=True)
    code, _, err = run_cli(capsys, "inspect", "owner/empty", "--adapter-name", "nope")
    assert code == 2 and "snapshot_download" not in err
    assert "no adapter 'nope' in owner/empty" in err and "it holds no adapter" in err


def test_the_hub_hint_stays_for_a_directory_that_does_not_exist(multi, capsys) -> None:
    for argv in (["owner/missing"], ["owner/missing", "--adapter-name", "x"]):
        code, _, err = run_cli(capsys, "inspect", *argv)
        assert code == 2 and "huggingface_hub.snapshot_download('owner/missing')" in err, err


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_file_given_as_the_directory_names_its_directory(multi, capsys, name) -> None:
    path = f"{multi}/{name}"
    expected = f"{path} is a file, not an adapter directory; give its directory {multi} instead."
    for argv in ([path], [path, "--adapter-name", "second"]):
        code, _, err = run_cli(capsys, "inspect", *argv)
        assert code == 2 and err == f"lorakit: error: {expected}\n", err
    with pytest.raises(AdapterFileError) as refused:
        lorakit.load_adapter(tiny_models.llama(), path)
    assert str(refused.value) == expected


def test_eval_with_the_config_file_as_adapter_names_its_directory(multi, capsys, model_dir) -> None:
    data = "data.jsonl"
    with open(data, "w", encoding="utf-8") as file:
        file.write('{"prompt": "hello", "completion": " fine"}\n')
    path = f"{multi}/adapter_config.json"
    code, out, err = run_cli(
        capsys, "eval", "--model", model_dir, "--adapter", path, "--data", data
    )
    assert code == 2 and out == ""
    assert err == (
        f"lorakit: error: {path} is a file, not an adapter directory; give its directory "
        f"{multi} instead.\n"
    )


def test_a_file_with_no_adapter_beside_it_asks_for_the_adapter_directory(tmp_path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an adapter")
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 2 and err == (
        f"lorakit: error: {path} is a file, not an adapter directory; give the adapter "
        "directory, the one holding adapter_config.json and adapter_model.safetensors.\n"
    )
