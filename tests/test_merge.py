"""Merge / unmerge: outputs agree, and the base weights come back bit-identical in every dtype,
however many cycles (PEFT drifts to 2.45e-2 after 100 bf16 cycles)."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit.layers import LoraLayer
from lorakit.state import lora_layers
from tests import tiny_models

CONFIG = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hundred_merge_unmerge_cycles_restore_base_bit_for_bit(dtype: torch.dtype) -> None:
    model = lorakit.inject(tiny_models.llama(dtype=dtype), CONFIG)
    tiny_models.randomize_adapters(model, std=0.2)
    before = _weights(model)
    for _ in range(100):
        lorakit.merge(model)
        lorakit.unmerge(model)
    after = _weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    # ... and merging really changed the weights in between.
    lorakit.merge(model)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == 14


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merged_and_unmerged_outputs_agree(arch: str) -> None:
    model = tiny_models.BUILDERS[arch]()
    targets = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc", "wte"], "bert": "all-linear"}
    config = CONFIG.replace(target_modules=targets[arch])
    lorakit.inject(model, config)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        lorakit.merge(model)
        merged = model(input_ids=ids).logits
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() <= 1e-5 * max(1.0, scale.item())


def test_merged_weight_is_w0_plus_scaled_ba_in_float64() -> None:
    model = lorakit.inject(tiny_models.gpt2(), CONFIG.replace(target_modules=["c_attn"]))
    tiny_models.randomize_adapters(model, std=0.2)
    layer = model.transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().double().clone()  # Conv1D: (in, out)
    lora_A = layer.lora_A["default"].weight.double()
    lora_B = layer.lora_B["default"].weight.double()
    expected = w0 + (8 / 4) * (lora_B @ lora_A).T
    lorakit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=0, atol=1e-6)


def test_merge_is_idempotent() -> None:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model)
    lorakit.merge(model)
    once = _weights(model)
    lorakit.merge(model)
    assert all(torch.equal(once[n], p) for n, p in model.named_parameters())


def test_non_finite_adapter_refuses_to_merge_and_changes_nothing() -> None:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model)
    last_layer = list(lora_layers(model))[-1][1]
    with torch.no_grad():
        last_layer.lora_B["default"].weight[0, 0] = float("nan")
    before = _weights(model)
    with pytest.raises(ValueError, match="non-finite"):
        lorakit.merge(model)
    assert all(
        torch.equal(
            before[n],
            p,
        )
        for n, p in model.named_parameters()
        if "lora_" not in n
    )
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))


@pytest.mark.parametrize("merge_call", [lorakit.merge, lorakit.merge_and_unload])
def test_overflowing_merge_in_half_precision_changes_no_layer(merge_call) -> None:
    """The overflow shows only once W0 + s B A is rounded to fp16, in the LAST layer: every
    earlier layer's merge must not have been installed either."""
    model = lorakit.inject(tiny_models.llama(dtype=torch.float16), CONFIG)
    tiny_models.randomize_adapters(model)
    last = list(lora_layers(model))[-1][1]
    with torch.no_grad():
        last.lora_B["default"].weight.fill_(1e4)
        last.lora_A["default"].weight.fill_(1e4)
    assert torch.isfinite(last.delta_weight("default")).all()  # finite in float32
    before = {n: p.clone() for n, p in model.named_parameters()}
    weights = {n: id(layer.base_layer.weight) for n, layer in lora_layers(model)}
    with pytest.raises(ValueError, match="non-finite"):
        merge_call(model)
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))
    assert weights == {n: id(layer.base_layer.weight) for n, layer in lora_layers(model)}
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_merge_and_unload_returns_a_plain_model_with_the_same_outputs() -> None:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = lorakit.merge_and_unload(model)
        actual = plain(input_ids=ids).logits
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora_" in name for name, _ in plain.named_parameters())
    assert "lorakit_state" not in plain.__dict__
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    reference = tiny_models.llama()
    assert set(plain.state_dict()) == set(reference.state_dict())


def test_merge_two_adapters_equals_their_sum() -> None:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    lorakit.inject(model, CONFIG, "second")
    tiny_models.randomize_adapters(model, std=0.2)
    lorakit.set_active(model, ["default", "second"])
    ids = tiny_models.input_ids()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        lorakit.merge(model)
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_merging_a_tied_embedding_leaves_the_output_embedding_alone() -> None:
    model = lorakit.inject(tiny_models.gpt2(), CONFIG.replace(target_modules=["wte", "c_attn"]))
    tiny_models.randomize_adapters(model, std=0.2)
    lm_head_before = model.lm_head.weight.detach().clone()
    ids = tiny_models.input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        plain = lorakit.merge_and_unload(model)
        actual = plain(input_ids=ids).logits
    assert torch.equal(plain.lm_head.weight, lm_head_before)
    assert not torch.equal(plain.transformer.wte.weight, lm_head_before)
    assert plain.config.tie_word_embeddings is False
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_a_trained_copy_of_a_tied_embedding_unties_the_config(saved, tmp_path) -> None:
    """The merge puts the trained copy in place of one of two tied embeddings: the config must
    stop saying tied, or a reader that trusts it (llama.cpp's converter, vLLM, older
    transformers) ties the trained matrix away."""
    torch.manual_seed(0)
    tied = LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    config = CONFIG.replace(target_modules=["q_proj"], modules_to_save=[saved])
    model = lorakit.inject(tied, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.5)
        expected = model(input_ids=tiny_models.input_ids()).logits
    plain = lorakit.merge_and_unload(model)
    assert plain.config.tie_word_embeddings is False
    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        actual = reloaded(input_ids=tiny_models.input_ids()).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_the_tie() -> None:
    model = lorakit.inject(tiny_models.gpt2(), CONFIG.replace(target_modules=["wte"]))
    tiny_models.randomize_adapters(model)
    lorakit.merge(model)
    assert model.transformer.wte.weight is not model.lm_head.weight
    lorakit.unmerge(model)
    assert model.transformer.wte.weight is model.lm_head.weight


def test_merge_on_a_model_without_adapters_says_so() -> None:
    with pytest.raises(ValueError, match="has no lorakit adapters"):
        lorakit.merge(tiny_models.llama())


@pytest.mark.usefixtures("one_torch_thread")  # three Python threads, one torch thread each
def test_merge_and_unmerge_while_other_threads_run_the_model_give_no_torn_output() -> None:
    """Each layer reads its merge state once per forward, so a forward that runs during a
    merge or unmerge computes every layer as merged or as unmerged, never the delta twice or not
    at all: its output equals the (merged = unmerged) reference whatever it saw."""
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids(batch=1, length=4)
    with torch.no_grad():
        with lorakit.disabled(model):
            base = model(input_ids=ids).logits
        reference = model(input_ids=ids).logits
    assert (reference - base).abs().max() > 0.1  # a missing or doubled delta shows
    outputs: list[torch.Tensor] = []

    def reader() -> None:
        with torch.no_grad():
            for _ in range(60):
                outputs.append(model(input_ids=ids).logits)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, inside forwards and merges
    try:
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        while any(thread.is_alive() for thread in readers):
            lorakit.merge(model)
            lorakit.unmerge(model)
        for thread in readers:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    errors = [(out - reference).abs().max().item() for out in outputs]
    torn = [error for error in errors if error > 1e-4]
    assert len(outputs) == 120 and not torn, f"{len(torn)} of 120 outputs torn: {torn[:5]}"


def test_a_call_choosing_other_adapters_than_the_merged_ones_adds_them_to_the_original() -> None:
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    lorakit.inject(model, CONFIG, "second", activate=False)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        with lorakit.use_adapters(model, ["default", "second"]):
            both = model(input_ids=ids).logits
        with lorakit.use_adapters(model, ["second"]):
            second = model(input_ids=ids).logits
        lorakit.merge(model, ["default"])
        with lorakit.use_adapters(model, ["default", "second"]):
            torch.testing.assert_close(model(input_ids=ids).logits, both, rtol=1e-5, atol=1e-5)
        with lorakit.use_adapters(model, ["second"]):
            torch.testing.assert_close(model(input_ids=ids).logits, second, rtol=1e-5, atol=1e-5)
    assert (both - second).abs().max() > 1e-2


def test_an_adapter_named_twice_is_refused_and_a_string_is_one_name() -> None:
    """Merging ['default', 'default'] used to fold the adapter in twice (and the forward then
    took the doubled weight as the merged state); each call that takes names refuses it."""
    model = lorakit.inject(tiny_models.llama(), CONFIG)
    tiny_models.randomize_adapters(model, std=0.2)
    ids = tiny_models.input_ids()
    with torch.no_grad():
        unmerged = model(ids).logits
    before = _weights(model)
    twice = ["default", "default"]
    for call in (
        lorakit.merge,
        lorakit.set_active,
        lambda m, n: lorakit.use_adapters(m, n).__enter__(),
    ):
        with pytest.raises(ValueError, match=r"\['default'\] named more than once"):
            call(model, twice)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    lorakit.merge(model, "default")  # one name, as PEFT takes it
    with torch.no_grad():
        assert (model(ids).logits - unmerged).abs().max() < 1e-4
    layer = next(layer for _, layer in lora_layers(model))
    layer.unmerge()
    layer.merge(["default", "default"])  # a layer merges each adapter once
    assert layer.merged_adapters == ("default",)
