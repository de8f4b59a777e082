"""Every field of ``peft.LoraConfig`` is in lorakit's table (``lorakit.peft_fields``), and the
table says what lorakit really does: a new PEFT field fails here instead of being dropped in
silence, a refused field is refused when read, an ignored one changes nothing, and
docs/adapter-files.md shows the same table."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import peft
import pytest

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io.config_json import config_from_json
from lorakit.peft_fields import IGNORED, PEFT_LORA_FIELDS, REFUSED, SUPPORTED
from tests.peft_versions import peft_lora_config_fields_added_after_installed

PEFT_FIELDS = [f.name for f in dataclasses.fields(peft.LoraConfig)]
LORAKIT_FIELDS = {f.name for f in dataclasses.fields(lorakit.LoraConfig)}
# Supported fields that are no lorakit.LoraConfig field: checked when a file is read, or the
# settings of an initialisation (issue 19 items 1-2, implemented beside init_lora_weights).
NOT_CONFIG_FIELDS = {"peft_type", "eva_config", "loftq_config"}
# Ignored when a file is read, but a lorakit.LoraConfig field with PEFT's meaning.
ACTING_IN_CONFIG = {"inference_mode"}
DOC = Path(__file__).resolve().parent.parent / "docs" / "adapter-files.md"
BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def unlisted(field_names: list[str]) -> list[str]:
    """The fields lorakit's table does not know."""
    return [name for name in field_names if name not in PEFT_LORA_FIELDS]


def _of(status: str) -> list[str]:
    return sorted(name for name, entry in PEFT_LORA_FIELDS.items() if entry.status == status)


def test_every_peft_lora_config_field_is_in_the_table():
    assert unlisted(PEFT_FIELDS) == []
    newer = peft_lora_config_fields_added_after_installed()
    stale = set(PEFT_LORA_FIELDS) - set(PEFT_FIELDS) - newer
    assert sorted(stale) == []  # no entries peft never had or has dropped


def test_a_field_peft_adds_is_reported_as_unlisted():
    assert unlisted([*PEFT_FIELDS, "lora_new_variant"]) == ["lora_new_variant"]


def test_every_entry_has_a_known_status_and_a_reason():
    for name, entry in PEFT_LORA_FIELDS.items():
        assert entry.status in (SUPPORTED, REFUSED, IGNORED), name
        assert len(entry.why) > 10, name


@pytest.mark.parametrize("name", _of(SUPPORTED))
def test_supported_fields_are_lorakit_config_fields(name):
    assert name in LORAKIT_FIELDS or name in NOT_CONFIG_FIELDS


@pytest.mark.parametrize("name", _of(REFUSED))
def test_refused_fields_are_refused_when_read_and_absent_from_the_config(name):
    with pytest.raises(AdapterFileError, match=name):
        config_from_json(json.dumps(BASE | {name: True}), "adapter_config.json")
    assert name not in LORAKIT_FIELDS
    with pytest.raises(ValueError, match=rf"LoraConfig\.{name}=True is a PEFT feature"):
        lorakit.LoraConfig(**{name: True})
    assert lorakit.LoraConfig(**{name: None}) == lorakit.LoraConfig()  # off: taken, dropped


@pytest.mark.parametrize("name", _of(IGNORED))
def test_ignored_fields_change_nothing_when_read(name):
    plain = config_from_json(json.dumps(BASE), "adapter_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even an "unknown key" warning
        read = config_from_json(json.dumps(BASE | {name: 7}), "adapter_config.json")
    assert read == plain
    if name not in ACTING_IN_CONFIG:
        assert name not in LORAKIT_FIELDS
        assert lorakit.LoraConfig(**{name: 7}) == lorakit.LoraConfig()  # taken and dropped


@pytest.mark.parametrize("name", sorted(ACTING_IN_CONFIG))
def test_fields_ignored_in_files_that_act_in_a_config(name):
    """inference_mode: a file always says true (the loader's is_trainable decides), but
    LoraConfig(inference_mode=True) freezes the adapter after injection, as in PEFT."""
    assert PEFT_LORA_FIELDS[name].status == IGNORED
    assert name in LORAKIT_FIELDS


def test_a_config_peft_writes_with_every_default_loads_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = config_from_json(text, "adapter_config.json")
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, ["q_proj"])


def test_the_doc_table_matches_the_source_table():
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", DOC.read_text(), flags=re.MULTILINE)
    assert dict(rows) == {name: entry.status for name, entry in PEFT_LORA_FIELDS.items()}
