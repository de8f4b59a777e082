"""Review 36b: the rest of LoRA on models accelerate offloaded (``cpu_offload``, ``disk_offload``,
``dispatch_model`` with "disk" entries; review 36's ``tests/test_offload_save_review36.py``).

1. An adapter file's base tensors (biases of ``bias="all"`` / ``"lora_only"``, an embedding's
   base weight) loaded onto an offloaded base were copied into meta tensors, which does nothing
   (GPT-2's logits 0.3 to 0.7 off, silently): they are now written into the hooks' offload maps
   (PEFT's loaded model is the oracle), and a load that fails puts the old maps back. Training
   such a bias there (its gradient went to each call's copy) is refused at the forward.
2. ``modules_to_save`` copies and token rows added BEFORE offloading were offloaded with the
   model: a head copy's gradients went to each call's copy (nothing trained) and token rows
   failed at the forward (meta). The first forward (or merge) loads them for good, into the
   Parameters an optimizer made before holds: gradients within 1e-6 of the plain model's, and
   the same SGD steps save the plain model's files byte for byte.
3. ``get_peft_model_state_dict`` returned meta tensors there: it reads them through their hooks
   (PEFT's function on PEFT's loaded model is the oracle); ``set_peft_model_state_dict`` copied
   into them (nothing kept): it loads the adapter for good first, and writes an offloaded base
   bias into its hook's map.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from peft import PeftModel as PeftPeftModel
from peft import get_peft_model_state_dict as peft_state_dict

import lorakit
from lorakit.fast import plain_path
from lorakit.io import load as io_load
from lorakit.layers.base import offload_hook
from lorakit.peft_state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from tests import offloaded_models, tiny_models
from tests.offloaded_models import (
    OFFLOADERS,
    TOL,
    assert_close,
    assert_same_files,
    logits_of,
    offload,
)

TOKENS = [1, 5, 7]
GPT2_OFFLOADERS = {name: OFFLOADERS[name] for name in ("cpu_offload", "disk_offload")}


# ---------------------------------------------------------------- 1. base tensors in the file
def _gpt2_with_biases(mode: str) -> torch.nn.Module:
    """The tiny GPT-2 (seed 0) with a random ``bias=mode`` adapter on ``c_attn``, every bias it
    trains moved 0.3 (as trained ones)."""
    config = lorakit.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias=mode)
    model = lorakit.inject(tiny_models.gpt2(seed=0), config)
    tiny_models.randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and parameter.requires_grad:
                parameter.add_(0.3)
    return model


@pytest.mark.parametrize("how", sorted(GPT2_OFFLOADERS))
@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_a_bias_file_loads_onto_an_offloaded_base_as_peft_loads_it(how, mode, tmp_path) -> None:
    lorakit.save_adapter(_gpt2_with_biases(mode), tmp_path / "adapter")
    want = logits_of(PeftPeftModel.from_pretrained(tiny_models.gpt2(seed=0), tmp_path / "adapter"))
    model = offload(tiny_models.gpt2(seed=0), how, tmp_path)
    lorakit.load_adapter(model, tmp_path / "adapter")
    assert_close(logits_of(model), want)
    assert model.transformer.h[1].attn.c_attn.base_layer.bias.is_meta  # (its value: the map's)
    lorakit.save_adapter(model, tmp_path / "again")  # the biases read back from the maps
    assert_same_files(tmp_path / "again", tmp_path / "adapter")


def test_a_load_that_fails_puts_the_offload_maps_back(tmp_path, monkeypatch) -> None:
    lorakit.save_adapter(_gpt2_with_biases("all"), tmp_path / "adapter")
    model = offload(tiny_models.gpt2(seed=0), "disk_offload", tmp_path)
    want = logits_of(model)
    hooks = [hook for module in model.modules() if (hook := offload_hook(module)) is not None]
    maps = [hook.weights_map for hook in hooks]

    def fail(*args):
        raise RuntimeError("a failure after the base tensors were written")

    monkeypatch.setattr(io_load, "_merged_over", fail)
    with pytest.raises(RuntimeError, match="after the base tensors were written"):
        lorakit.load_adapter(model, tmp_path / "adapter")
    assert all(hook.weights_map is old for hook, old in zip(hooks, maps, strict=True))
    assert not lorakit.adapter_configs(model)
    assert_close(logits_of(model), want)


def test_an_embedding_base_weight_in_the_file_loads_into_the_offload_map(tmp_path) -> None:
    model = tiny_models.llama(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5)  # (a resized vocabulary's new base weight)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, tmp_path / "adapter", save_embedding_layers=True)
    want = logits_of(PeftPeftModel.from_pretrained(tiny_models.llama(seed=0), tmp_path / "adapter"))
    offloaded = offload(tiny_models.llama(seed=0), "dispatch_model", tmp_path)
    lorakit.load_adapter(offloaded, tmp_path / "adapter")
    assert_close(logits_of(offloaded), want)


@pytest.mark.parametrize("when", ["before", "after"])
def test_training_an_offloaded_base_bias_is_refused_at_the_forward(when, tmp_path) -> None:
    """Adapter added before or after offloading; under no_grad the outputs are exact."""
    plain = _gpt2_with_biases("lora_only")
    if when == "before":
        model = offload(_gpt2_with_biases("lora_only"), "cpu_offload", tmp_path)
    else:
        lorakit.save_adapter(plain, tmp_path / "adapter")
        model = offload(tiny_models.gpt2(seed=0), "cpu_offload", tmp_path)
        lorakit.load_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"bias of this Conv1D trains .* accelerate offloaded"):
        model(tiny_models.input_ids(), labels=tiny_models.input_ids())
    assert_close(logits_of(model), logits_of(plain))


# ---------------------------------------------------------------- 2. copies offloaded too
_adapted = functools.partial(offloaded_models.adapted, ["q_proj", "v_proj"])

COPIES = {
    "head_copy": {"modules_to_save": ["lm_head"]},
    "token_rows": {"trainable_token_indices": TOKENS},
}


@pytest.fixture(params=sorted(OFFLOADERS))
def how(request) -> str:
    return request.param


@pytest.mark.parametrize("kind", sorted(COPIES))
def test_copies_offloaded_with_the_model_train_as_on_the_plain_model(how, kind, tmp_path) -> None:
    plain, model = _adapted(**COPIES[kind]), offload(_adapted(**COPIES[kind]), how, tmp_path)
    copies = {n: p for n, p in model.named_parameters() if "modules_to_save" in n}
    assert copies and all(p.is_meta for p in copies.values())  # (the optimizer's, on meta)
    for each in (plain, model):
        each(tiny_models.input_ids(), labels=tiny_models.input_ids()).loss.backward()
    for name, want in plain.named_parameters():
        if name in copies:
            got = copies[name].grad
            assert got is not None and (got - want.grad).abs().max().item() <= TOL, name
    plain.zero_grad(), model.zero_grad()
    with plain_path():  # (both the plain formula: the same roundings)
        trained_plain = tiny_models.sgd_steps(plain, tiny_models.input_ids(), steps=2, lr=0.5)
        trained = tiny_models.sgd_steps(model, tiny_models.input_ids(), steps=2, lr=0.5)
    assert {id(p) for p in copies.values()} <= {id(p) for p in trained}  # (those objects)
    assert all(torch.equal(a, b) for a, b in zip(trained, trained_plain, strict=True))
    for label, each in (("plain", plain), ("offloaded", model)):
        lorakit.save_adapter(each, tmp_path / label)
    assert_same_files(tmp_path / "offloaded", tmp_path / "plain")
    peft_model = PeftPeftModel.from_pretrained(tiny_models.llama(seed=0), tmp_path / "offloaded")
    assert_close(logits_of(model.eval()), logits_of(peft_model))


def test_token_rows_offloaded_with_the_model_merge_before_any_forward(how, tmp_path) -> None:
    want = logits_of(lorakit.merge_and_unload(_adapted(trainable_token_indices=TOKENS)))
    model = offload(_adapted(trainable_token_indices=TOKENS), how, tmp_path)
    assert_close(logits_of(lorakit.merge_and_unload(model)), want)


# ---------------------------------------------------------------- 3. get_peft_model_state_dict
@pytest.mark.parametrize("kind", ["lora", *sorted(COPIES)])
def test_get_peft_model_state_dict_reads_offloaded_tensors(how, kind, tmp_path) -> None:
    plain = _adapted(**COPIES.get(kind, {}))
    lorakit.save_adapter(plain, tmp_path / "adapter")
    peft_model = PeftPeftModel.from_pretrained(tiny_models.llama(seed=0), tmp_path / "adapter")
    want = peft_state_dict(peft_model)
    model = offload(_adapted(**COPIES.get(kind, {})), how, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PEFT's note on the embedding it does not save)
        got = get_peft_model_state_dict(model)
    assert got.keys() == want.keys()
    for key, tensor in got.items():
        assert not tensor.is_meta, key
        assert torch.equal(tensor, want[key].to(tensor.dtype)), key
    assert model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.is_meta  # read only


@pytest.mark.parametrize("kind", ["lora", *sorted(COPIES)])
def test_set_peft_model_state_dict_writes_into_offloaded_tensors(how, kind, tmp_path) -> None:
    plain = _adapted(**COPIES.get(kind, {}))
    lorakit.save_adapter(plain, tmp_path / "adapter")
    want = logits_of(PeftPeftModel.from_pretrained(tiny_models.llama(seed=0), tmp_path / "adapter"))
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject(tiny_models.llama(seed=0), config.replace(**COPIES.get(kind, {})))
    offload(model, how, tmp_path)
    result = set_peft_model_state_dict(model, get_peft_model_state_dict(plain))
    assert not result.unexpected_keys
    assert_close(logits_of(model), want)


def test_set_peft_model_state_dict_writes_an_offloaded_bias_into_its_map(tmp_path) -> None:
    plain = _gpt2_with_biases("all")
    lorakit.save_adapter(plain, tmp_path / "adapter")
    want = logits_of(PeftPeftModel.from_pretrained(tiny_models.gpt2(seed=0), tmp_path / "adapter"))
    config = lorakit.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    model = offload(lorakit.inject(tiny_models.gpt2(seed=0), config), "disk_offload", tmp_path)
    for _ in range(2):  # (written twice: the map stays one overlay deep)
        set_peft_model_state_dict(model, get_peft_model_state_dict(plain))
    assert_close(logits_of(model), want)
    hook = offload_hook(model.transformer.h[0].attn.c_attn.base_layer)
    assert not isinstance(hook.weights_map.maps[1], type(hook.weights_map))
