"""``disable_adapter_layers()`` freezes what PEFT freezes and nothing more.

PEFT's ``disable_adapter_layers`` switches each adapter layer off (``enable_adapters(False)``
freezes its LoRA tensors and the ``modules_to_save`` copies); the biases a ``bias="all"`` /
``"lora_only"`` adapter trains keep their flags. lorakit used to freeze those biases too, so
a training loop run while disabled stopped updating them where PEFT's kept training them.
"""

from __future__ import annotations

import warnings

import peft
import pytest

from lorakit import LoraConfig, get_peft_model
from tests import tiny_models


def _trainable(model) -> list[str]:
    names = (name for name, p in model.named_parameters() if p.requires_grad)
    return sorted(name.removeprefix("base_model.").removeprefix("model.") for name in names)


def _pair(**fields):
    ours = get_peft_model(tiny_models.gpt2(), LoraConfig(**fields))
    theirs = peft.get_peft_model(tiny_models.gpt2(), peft.LoraConfig(**fields))
    return ours, theirs


def _names(names: list[str]) -> list[str]:
    """Both libraries' names in one spelling (PEFT's ``modules_to_save.default`` copies,
    ``base_layer`` wrappers and lorakit's are the same tensors)."""
    return sorted(n.replace(".base_layer", "").replace("modules_to_save.", "") for n in names)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("saved", [None, ["lm_head"]])
def test_disable_adapter_layers_flags_match_peft(bias, saved):
    fields = dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias=bias)
    ours, theirs = _pair(**fields, modules_to_save=saved)
    flags = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        before = _trainable(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.disable_adapter_layers()
        disabled = _trainable(model)
        model.enable_adapter_layers()
        flags[name] = (_names(before), _names(disabled), _names(_trainable(model)))
    assert flags["ours"] == flags["theirs"]
    before, disabled, after = flags["ours"]
    assert after == before
    assert not any("lora_" in name for name in disabled)
    if bias != "none":
        assert any(name.endswith("bias") for name in disabled)  # kept training, as in PEFT
