"""Fixes from the differential fuzzer against peft (the real ``peft`` package is the oracle):
what lorakit writes to ``adapter_config.json``, and the warnings on the way.

1. ``target_modules="all-linear"`` with the output head in ``modules_to_save``: the file's
   ``target_modules`` is "all-linear" resolved as PEFT resolves it, without the head (lorakit
   wrote ``lm_head`` too: on the adapted model the head is a saved-module wrapper, no longer
   known as the head; the file still loaded the same, a saved module taking no LoRA in either
   library, but it was not PEFT's file);
2. ``fan_in_fan_out``: PEFT's dispatch warns and sets the config's flag to the layout of each
   layer it wraps anew (False on an ``nn.Linear``, True on a ``Conv1D``), so its file says what
   the last such layer forced; lorakit warned (on ``nn.Linear`` only) but kept and wrote the
   user's value.
"""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest

import lorakit
from lorakit.errors import FanInFanOutWarning
from lorakit.io.config_json import config_to_json
from tests import tiny_models as tm
from tests.cli_runs import run_cli

_FLIP = re.compile(
    r"fan_in_fan_out is set to (True|False)\b.*Setting fan_in_fan_out to (True|False)"
)


def _flips(caught) -> list[tuple[bool, bool]]:
    """``(from, to)`` of each fan_in_fan_out warning in ``caught``, in order."""
    found = [_FLIP.search(str(w.message).replace("\n", " ")) for w in caught]
    return [(m[1] == "True", m[2] == "True") for m in found if m]


def _adapted(lib, arch: str, fields: dict, tmp_path):
    """``(file's config, the config object after, fan_in_fan_out flips)`` of ``lib``'s
    ``get_peft_model`` on a tiny ``arch`` with ``fields``, saved to ``tmp_path/<lib>``."""
    config = lib.LoraConfig(r=2, lora_alpha=4, **fields)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lib.get_peft_model(tm.BUILDERS[arch](), config)
    directory = tmp_path / lib.__name__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    written = json.loads((directory / "adapter_config.json").read_text())
    return written, config, _flips(caught)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_with_a_saved_head_writes_the_linears_peft_writes(arch, tmp_path):
    fields = {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}
    ours, _, _ = _adapted(lorakit, arch, fields, tmp_path)
    theirs, _, _ = _adapted(peft, arch, fields, tmp_path)
    assert "lm_head" not in ours["target_modules"]
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert len(ours["target_modules"]) == {"llama": 14, "gpt2": 8}[arch]
    assert ours["modules_to_save"] == ["lm_head"]


def test_peft_loads_the_all_linear_file_without_a_lora_on_the_saved_head(tmp_path):
    fields = {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}
    _adapted(lorakit, "llama", fields, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tm.llama(), tmp_path / "lorakit")
    lora = [n for n, m in loaded.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert not [n for n in lora if "lm_head" in n]
    assert len(lora) == 14
    assert type(loaded.base_model.model.lm_head).__name__ == "ModulesToSaveWrapper"


@pytest.mark.parametrize(
    ("arch", "fields"),
    [
        ("bert", {"task_type": "SEQ_CLS"}),  # the classification head, saved in full
        ("llama", {"modules_to_save": ["q_proj"]}),  # peft's list keeps a saved projection
        ("llama", {"exclude_modules": ["k_proj"]}),  # and an excluded one
    ],
)
def test_all_linear_names_stay_peft_s_with_other_saved_or_excluded_modules(arch, fields, tmp_path):
    fields = {"target_modules": "all-linear", **fields}
    ours, _, _ = _adapted(lorakit, arch, fields, tmp_path)
    theirs, _, _ = _adapted(peft, arch, fields, tmp_path)
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


@pytest.mark.parametrize(
    ("arch", "fields", "flips", "written"),
    [
        ("llama", {"target_modules": ["q_proj"], "fan_in_fan_out": True}, [(True, False)], False),
        ("llama", {"target_modules": ["q_proj"]}, [], False),
        ("gpt2", {"target_modules": ["c_attn"]}, [(False, True)], True),
        ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, [], True),
        ("gpt2", {"target_modules": ["c_attn", "wte"]}, [(False, True)], True),  # no embedding
        # Conv1D blocks first, then the nn.Linear head: flipped twice, the head's layout last
        ("gpt2", {"target_modules": ["c_attn", "lm_head"]}, [(False, True), (True, False)], False),
        (
            "gpt2",
            {"target_modules": ["c_fc", "lm_head"], "fan_in_fan_out": True},
            [(True, False)],
            False,
        ),
    ],
)
def test_fan_in_fan_out_is_warned_set_and_written_as_peft_does(
    arch, fields, flips, written, tmp_path
):
    ours, our_config, our_flips = _adapted(lorakit, arch, fields, tmp_path)
    theirs, their_config, their_flips = _adapted(peft, arch, fields, tmp_path)
    assert their_flips == flips and their_config.fan_in_fan_out is written  # (the oracle)
    assert theirs["fan_in_fan_out"] is written
    assert our_flips == flips
    assert our_config.fan_in_fan_out is written
    assert ours["fan_in_fan_out"] is written


def test_the_fan_in_fan_out_warning_names_the_module_and_what_is_set():
    with pytest.warns(UserWarning) as caught:
        lorakit.get_peft_model(tm.gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    (message,) = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert message.startswith(
        "fan_in_fan_out is set to False but the target module 'transformer.h.0.attn.c_attn' "
        "(and 1 more) is a transformers Conv1D, whose weight is stored (in, out). Setting "
        "fan_in_fan_out to True"
    )
    assert "Pass fan_in_fan_out=True to avoid this" in message
    assert all(isinstance(w.message, FanInFanOutWarning) for w in caught if w.message is message)


def test_the_command_line_which_sets_no_fan_in_fan_out_does_not_show_the_warning(tmp_path, capsys):
    """`lorakit plan` on a GPT-2 directory: the commands choose no fan_in_fan_out (the file
    gets PEFT's value), so PEFT's "pass fan_in_fan_out=True" warning has no option to act on."""
    tm.gpt2().save_pretrained(tmp_path / "gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(capsys, "plan", str(tmp_path / "gpt2"))
    assert code == 0 and "trainable params" in out and "fan_in_fan_out" not in err
    assert not any("fan_in_fan_out" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("arch", "first", "second"),
    [
        # the second adapter's layers were wrapped by the first: peft leaves the flag alone
        ("gpt2", ["c_attn"], {"target_modules": ["c_attn"]}),
        ("llama", ["q_proj"], {"target_modules": ["q_proj"], "fan_in_fan_out": True}),
        ("gpt2", ["c_attn"], {"target_modules": ["c_attn", "c_fc"]}),  # c_fc wrapped anew
    ],
)
def test_a_second_adapter_s_flag_and_warnings_are_peft_s(arch, first, second, tmp_path):
    results = {}
    for lib in (lorakit, peft):
        model = lib.get_peft_model(tm.BUILDERS[arch](), lib.LoraConfig(r=2, target_modules=first))
        config = lib.LoraConfig(r=2, **second)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.add_adapter("two", config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / lib.__name__)
        text = (tmp_path / lib.__name__ / "two" / "adapter_config.json").read_text()
        results[lib] = (_flips(caught), config.fan_in_fan_out, json.loads(text)["fan_in_fan_out"])
    assert results[lorakit] == results[peft]


def test_loading_a_file_warns_and_sets_the_flag_as_peft_loading_it_does(tmp_path):
    fields = {"target_modules": ["c_attn", "lm_head"]}
    ours, _, _ = _adapted(lorakit, "gpt2", fields, tmp_path)
    assert ours["fan_in_fan_out"] is False  # the head's layout, as peft writes it
    results = {}
    for lib in (lorakit, peft):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = lib.PeftModel.from_pretrained(tm.gpt2(), tmp_path / "lorakit")
        results[lib] = (_flips(caught), loaded.peft_config["default"].fan_in_fan_out)
    assert results[lorakit] == results[peft] == ([(False, True), (True, False)], False)


@pytest.mark.parametrize(
    ("arch", "names", "value", "written"),
    [
        ("llama", ["model.layers.0.self_attn.q_proj"], True, False),
        ("gpt2", ["transformer.h.0.attn.c_attn"], False, True),
        ("gpt2", ["transformer.h.1.attn.c_attn", "lm_head"], True, False),
    ],
)
def test_a_config_built_for_a_file_is_written_with_peft_s_flag(arch, names, value, written):
    """A config no injection settled (a GGUF adapter's, a plan's): settled on the layers named,
    in model order whatever the order given."""
    model = tm.BUILDERS[arch]()
    config = lorakit.LoraConfig(r=2, target_modules=names, fan_in_fan_out=value)
    modules = [model.get_submodule(name) for name in reversed(names)]
    assert json.loads(config_to_json(model, config, modules))["fan_in_fan_out"] is written
    assert config.fan_in_fan_out is value  # (written, not changed)


def test_a_config_with_target_parameters_keeps_its_fan_in_fan_out_and_stays_valid():
    """``fan_in_fan_out=True`` is refused with ``target_parameters``: the injection must not
    set it on the user's config (a copy or ``replace`` of it would then fail its own checks)."""
    config = lorakit.LoraConfig(
        r=2, target_modules=["c_attn"], target_parameters=["mlp.c_proj.weight"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.get_peft_model(tm.gpt2(), config)
    assert config.fan_in_fan_out is False
    assert config.replace(r=4).r == 4
