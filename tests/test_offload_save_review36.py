"""Review 36: adapters added BEFORE accelerate offloaded the model, and the plan of a weight-only
base whose class keeps layers in float.

1. accelerate offloads the adapter tensors too (``cpu_offload``, ``disk_offload``,
   ``dispatch_model`` with "disk" entries: ``lora_A`` / ``lora_B``, DoRA magnitudes, a head
   copy, token rows on the meta device). ``save_adapter`` read them there ("Cannot copy out of
   meta tensor"); it now reads them with their modules loaded by their hooks for the read, and
   writes the non-offloaded model's files byte for byte (peft loads them to the plain logits),
   leaving the model offloaded. A training step's gradients went to tensors dropped after each
   call (none reached the model's Parameters, which stayed on meta); the first forward now
   loads a LoRA layer's adapter tensors for good, into the Parameters an optimizer made before
   it holds: gradients within 1e-6 of the plain model's. A DoRA adapter there is refused at the
   forward with the way out (torch's meta-device error before). A second adapter file loaded
   into such a model gives the plain model's logits.
2. ``lorakit plan --quantization int8-rows|int4-groups`` counted T5's ``wo`` (its class's
   ``_keep_in_fp32_modules``, which loading leaves float) as quantized: the plan's base bytes
   are now the loaded model's parameter and buffer bytes.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from peft import PeftModel as PeftPeftModel
from safetensors.torch import load_file
from transformers import T5Config, T5ForConditionalGeneration

import lorakit
from lorakit.errors import UserError
from lorakit.plan import plan
from lorakit.quantized import footprint, is_quantized
from lorakit.quantized.loading import cast_unquantized, quantize_loaded
from tests import offloaded_models, tiny_models
from tests.offloaded_models import (
    CPU,
    FILES,
    OFFLOADERS,
    TOL,
    assert_close,
    assert_same_files,
    logits_of,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
TOKENS = [1, 5, 7]
_adapted = functools.partial(offloaded_models.adapted, TARGETS)


@pytest.fixture(params=sorted(OFFLOADERS))
def offload(request, tmp_path):
    """Offload a model one way (each call its own folder); its layer-1 adapter is then on meta."""

    def offloaded(model: torch.nn.Module) -> torch.nn.Module:
        offloaded_models.offload(model, request.param, tmp_path)
        assert _layer1_factor(model).is_meta
        return model

    return offloaded


def _layer1_factor(model: torch.nn.Module) -> torch.Tensor:
    return model.model.layers[1].self_attn.q_proj.lora_A["default"].weight


# ---------------------------------------------------------------- 1. save_adapter
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"target_modules": ["embed_tokens", "q_proj"]},
        {"use_dora": True},
        {"modules_to_save": ["lm_head"]},
        {"trainable_token_indices": TOKENS},
    ],
    ids=["lora", "embedding", "dora", "head_copy", "token_rows"],
)
def test_save_after_offloading_writes_the_plain_models_files(offload, overrides, tmp_path):
    lorakit.save_adapter(_adapted(**overrides), tmp_path / "plain")
    model = offload(_adapted(**overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (every base weight read: no "unrecorded" warning)
        lorakit.save_adapter(model, tmp_path / "offloaded")
    assert_same_files(tmp_path / "offloaded", tmp_path / "plain")
    assert _layer1_factor(model).is_meta  # offloaded again after the read


def test_peft_loads_the_saved_file_to_the_plain_models_logits(offload, tmp_path) -> None:
    want = logits_of(_adapted())
    lorakit.save_adapter(offload(_adapted()), tmp_path / "adapter")
    peft_model = PeftPeftModel.from_pretrained(tiny_models.llama(seed=0), tmp_path / "adapter")
    assert_close(logits_of(peft_model), want)


def test_a_tensor_on_meta_with_no_offload_map_is_refused_naming_it(tmp_path) -> None:
    with torch.device("meta"):  # (no values, and no offload map to read them from)
        model = tiny_models.LlamaForCausalLM(tiny_models.llama_config())
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(UserError, match=f"tensor '{key}'.*no accelerate offload map"):
        lorakit.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- forward, training, merging
def test_forward_and_training_steps_match_the_plain_model(offload, tmp_path) -> None:
    plain, model = _adapted(), offload(_adapted())
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(p.is_meta for p in parameters.values())  # (the optimizer's, made on meta)
    assert_close(logits_of(model), logits_of(plain))
    for each in (plain, model):
        each(tiny_models.input_ids(), labels=tiny_models.input_ids()).loss.backward()
    for name, want in plain.named_parameters():
        if want.requires_grad:
            got = parameters[name].grad
            assert got is not None and (got - want.grad).abs().max().item() <= TOL, name
    plain.zero_grad(), model.zero_grad()
    trained_plain = tiny_models.sgd_steps(plain, tiny_models.input_ids(), steps=2, lr=0.5)
    trained = tiny_models.sgd_steps(model, tiny_models.input_ids(), steps=2, lr=0.5)
    assert list(map(id, trained)) == list(map(id, parameters.values()))  # (those objects)
    for got, want in zip(trained, trained_plain, strict=True):
        assert (got - want).abs().max().item() <= TOL
    assert_close(logits_of(model.eval()), logits_of(plain.eval()))
    for label, each in (("p", plain), ("o", model)):
        lorakit.save_adapter(each, tmp_path / label)
    saved, want = (load_file(tmp_path / x / FILES[0]) for x in ("o", "p"))
    assert all((saved[key] - want[key]).abs().max().item() <= TOL for key in want)
    assert _layer1_factor(model).device == CPU  # loaded for good (training changed it)
    assert model.model.layers[1].self_attn.q_proj.base_layer.weight.is_meta  # the base: not
    assert_close(
        logits_of(lorakit.merge_and_unload(model)), logits_of(lorakit.merge_and_unload(plain))
    )


def test_merge_and_unload_before_any_forward_merges_the_offloaded_adapters(offload) -> None:
    """The adapter tensors are on meta until a forward loads them; merge_and_unload loads them
    first (it merged the meta factors, writing meta weights into the offload map)."""
    want = logits_of(lorakit.merge_and_unload(_adapted()))
    assert_close(logits_of(lorakit.merge_and_unload(offload(_adapted()))), want)


def test_merge_is_refused_unchanged_and_a_merge_before_offloading_unmerges(offload) -> None:
    want = logits_of(_adapted())
    model = offload(_adapted())
    with pytest.raises(ValueError, match="Use merge_and_unload"):
        lorakit.merge(model)
    assert_close(logits_of(model), want)
    merged = _adapted()
    lorakit.merge(merged)
    offload(merged)
    assert_close(logits_of(merged), want)
    lorakit.unmerge(merged)
    assert_close(logits_of(merged), want)
    with lorakit.disabled(merged):
        assert_close(logits_of(merged), logits_of(tiny_models.llama(seed=0)))


def test_a_dora_adapter_on_the_offloaded_model_is_refused_at_the_forward(offload) -> None:
    model = offload(_adapted(use_dora=True))
    with pytest.raises(ValueError, match=r"uses DoRA .* accelerate offloaded this Linear"):
        logits_of(model)


def test_loading_a_file_into_a_model_offloaded_with_its_adapters(offload, tmp_path) -> None:
    other = _adapted(r=2, target_modules=["o_proj", "up_proj"], modules_to_save=["lm_head"])
    lorakit.save_adapter(other, tmp_path / "other")
    model = offload(_adapted())
    lorakit.load_adapter(model, tmp_path / "other", adapter_name="other")
    lorakit.set_active(model, "other")
    assert_close(logits_of(model), logits_of(other))
    lorakit.set_active(model, "default")
    assert_close(logits_of(model), logits_of(_adapted()))
    lorakit.save_adapter(model, tmp_path / "again", adapter_name="other")
    assert_same_files(tmp_path / "again" / "other", tmp_path / "other")


# ---------------------------------------------------------------- 2. plan of a T5 base
T5_SIZES = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (quantized storage), each tensor once."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int8-rows", "int4-groups"])
def test_a_t5_plans_the_bytes_its_weight_only_load_holds(tmp_path, quantization, dtype) -> None:
    config = T5Config(**T5_SIZES, decoder_start_token_id=0, tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    result = plan(str(tmp_path), quantization=quantization, dtype=dtype, r=4)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    quantize_loaded(model, quantization, None)  # what load_model(quantization=...) runs
    cast_unquantized(model, getattr(torch, dtype))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is torch.nn.Linear  # kept in float by the load
    assert result.base_bytes == _held_bytes(model)
    quantized_layers = [m for m in model.modules() if is_quantized(m)]
    adapted = lorakit.LoraConfig(r=4, target_modules="all-linear")  # wo too: a LoRA layer
    injected = lorakit.inject(T5ForConditionalGeneration(config), adapted)
    assert len(footprint.weight_only_layers(injected)) == len(quantized_layers)
