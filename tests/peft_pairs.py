"""lorakit's and peft's front-door models holding the same adapters, for parity tests."""

from __future__ import annotations

import peft

from lorakit import LoraConfig, get_peft_model
from tests import tiny_models


def copy_into_peft(ours, theirs) -> None:
    """Our adapter tensors into peft's model (peft's keys: ours + 'base_model.model.')."""
    copied = {
        "base_model.model." + key: value
        for key, value in ours.model.state_dict().items()
        if "lora_" in key
    }
    missing = set(copied) - set(theirs.state_dict())
    assert not missing, missing
    theirs.load_state_dict(copied, strict=False)


def front_door_pair(first: dict, second: dict, second_name: str):
    """``(ours, theirs)``: a tiny Llama through each ``get_peft_model`` with adapter "default"
    (``first``'s fields, active) and ``second_name`` (``second``'s), the same random non-zero
    factors in both, in eval mode."""
    ours = get_peft_model(tiny_models.llama(), LoraConfig(**first))
    ours.add_adapter(second_name, LoraConfig(**second))
    tiny_models.randomize_adapters(ours.model, std=0.2)
    theirs = peft.get_peft_model(tiny_models.llama(), peft.LoraConfig(**first))
    theirs.add_adapter(second_name, peft.LoraConfig(**second))
    copy_into_peft(ours, theirs)
    return ours.eval(), theirs.eval()


def adapter_tensor_pairs(theirs, ours) -> dict:
    """``{key: (peft's tensor, lorakit's tensor)}`` for every LoRA tensor of a PEFT model and a
    lorakit model of the same adapters (PEFT's ``base_model.model.`` prefix taken off); the
    two hold the same, non-empty set of keys."""
    their_state = {
        key.removeprefix("base_model.model."): value
        for key, value in theirs.state_dict().items()
        if "lora_" in key
    }
    our_state = {key: value for key, value in ours.state_dict().items() if "lora_" in key}
    assert set(their_state) == set(our_state)
    assert their_state
    return {key: (their_state[key], our_state[key]) for key in sorted(their_state)}
