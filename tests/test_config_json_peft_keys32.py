"""``adapter_config.json`` carries PEFT's ``auto_mapping`` and ``eva_config``.

- A task-less adapter (no ``task_type``: Whisper, encoders, custom models) was written with
  ``auto_mapping: null``; ``peft.AutoPeftModel.from_pretrained`` needs the base class there and
  refused the file ("Cannot infer the auto class from the config").
- ``eva_config`` was neither written nor read: PEFT reading lorakit's file warned and took the
  default settings (rho 2 for a file made with rho 4), and lorakit reading PEFT's forgot them.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch

import lorakit
from lorakit.io.config_json import config_from_json
from tests import tiny_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _written(tmp_path, **fields) -> dict:
    model = lorakit.get_peft_model(tiny_models.llama(), lorakit.LoraConfig(r=2, **fields))
    model.save_pretrained(tmp_path / "adapter")
    return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


def test_a_task_less_file_names_the_model_class_as_peft_writes_it(tmp_path):
    ours = _written(tmp_path / "ours", target_modules=["q_proj"])
    theirs = peft.get_peft_model(
        tiny_models.llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    theirs.save_pretrained(tmp_path / "theirs")
    expected = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert expected["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama.modeling_llama",
    }
    assert ours["auto_mapping"] == expected["auto_mapping"]
    assert (
        _written(tmp_path / "task", target_modules=["q_proj"], task_type="CAUSAL_LM")[
            "auto_mapping"
        ]
        is None
    )  # (PEFT: a task type picks the auto class)


def test_auto_peft_model_opens_a_task_less_lorakit_file(tmp_path):
    base = tiny_models.llama()
    base.save_pretrained(tmp_path / "base")
    model = lorakit.get_peft_model(
        tiny_models.llama(),
        lorakit.LoraConfig(
            r=2,
            target_modules=["q_proj"],
            init_lora_weights=False,
            base_model_name_or_path=str(tmp_path / "base"),
        ),
    )
    model.save_pretrained(tmp_path / "adapter")
    opened = peft.AutoPeftModel.from_pretrained(tmp_path / "adapter").eval()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(opened(ids).logits, model.eval()(ids).logits)


def test_eva_config_is_written_and_read_as_peft_does(tmp_path):
    settings = {"rho": 4.0, "whiten": True}
    peft_file_value = dataclasses.asdict(peft.EvaConfig(**settings))  # as PEFT's to_dict writes it
    ours = _written(
        tmp_path,
        target_modules=["q_proj"],
        init_lora_weights="eva",
        eva_config=lorakit.EvaConfig(**settings),
    )
    assert ours["eva_config"] == peft_file_value
    theirs = json.dumps({**ours, "eva_config": peft_file_value})
    assert config_from_json(theirs, "a PEFT file").eva_config == lorakit.EvaConfig(**settings)
    assert "eva_config" not in _written(tmp_path / "plain", target_modules=["q_proj"])


def test_a_combined_task_less_adapter_keeps_its_base_class(tmp_path):
    """``lorakit combine`` wrote ``auto_mapping: null``: the result of task-less inputs could
    not be opened by ``peft.AutoPeftModel``, and ``lorakit export`` lost the check that refuses
    a base of another architecture."""
    for name, fields in (("a", {}), ("b", {"task_type": "CAUSAL_LM"})):
        model = lorakit.get_peft_model(
            tiny_models.llama(),
            lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, **fields),
        )
        model.save_pretrained(tmp_path / name)
    expected = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["auto_mapping"]
    assert expected["base_model_class"] == "LlamaForCausalLM"
    lorakit.combine([tmp_path / "a", tmp_path / "a"], [0.5, 0.5]).save(tmp_path / "aa")
    written = json.loads((tmp_path / "aa" / "adapter_config.json").read_text())
    assert written["auto_mapping"] == expected
    on_model = lorakit.inject(
        tiny_models.llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    )
    combined = lorakit.combine(["default", "default"], [1.0, 1.0], model=on_model)
    assert combined.auto_mapping == expected
