"""Adapters on a base offloaded by accelerate, review 35 (session 34 made LoRA layers work there:
``tests/test_offloaded_base34.py``). Each test compares values with the plain model's:

1. ``modules_to_save`` on an offloaded module: the copy holds the real weights (read from the
   hook's offload map onto its execution device, without the hook), so loading, training,
   saving and ``merge_and_unload`` equal the plain model's, and the original's map is untouched
   (the copy was on the meta device: a trained head's values were dropped, no gradient);
2. a hook on a PARENT module (``cpu_offload(..., preload_module_classes=[...])``) is refused
   by ``inject`` / ``load_adapter`` before any change, naming the module and the way out (the
   forward raised a ``KeyError``); the unverifiable-base note names that hook;
3. ``trainable_token_indices`` on an offloaded embedding: rows read through the offload map,
   the forward through the embedding's hook, merged rows written into its map (everything
   raised ``NotImplementedError``);
4. ``unmerge`` on a model offloaded after its merge writes ``W0`` back into the offload maps,
   and the adapter tensors accelerate offloaded with it are loaded for each call (the outputs
   were off by ~1, silently); a delete that would merge other adapters back there is refused;
5. ``load_adapter`` reads each disk-offloaded base weight once (it read each twice).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from accelerate.utils import offload as accelerate_offload
from safetensors.torch import load_file

import lorakit
from lorakit.errors import AdapterFileError, BaseModelMismatchError
from lorakit.io import base_verdicts
from lorakit.state import lora_layers
from tests import offloaded_models, tiny_models
from tests.offloaded_models import DEVICE_MAP, TOL, assert_close, logits_of

TARGETS = ["q_proj", "v_proj", "down_proj"]
TOKENS = [1, 5, 7]


def _config(**overrides) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": TARGETS} | overrides))


def _device_mapped(tmp_path: Path) -> torch.nn.Module:
    return offloaded_models.device_mapped(tmp_path, DEVICE_MAP)


OFFLOADERS = {"cpu_offload": offloaded_models.cpu_offloaded, "device_map": _device_mapped}


@pytest.fixture(params=sorted(OFFLOADERS))
def offloaded(request, tmp_path):
    """A builder of the tiny Llama (seed 0) offloaded one way: its head and embedding on meta."""

    def build() -> torch.nn.Module:
        model = OFFLOADERS[request.param](tmp_path)
        assert model.lm_head.weight.is_meta and model.model.embed_tokens.weight.is_meta
        return model

    return build


def _saved_adapter(directory: Path, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Save a random adapter of the plain tiny Llama in ``directory``, its head copy or token
    rows (if any) moved 0.5 away from the base's, as trained ones; its ``(logits, merged
    logits)`` there."""
    model = lorakit.inject(tiny_models.llama(seed=0), _config(**overrides))
    tiny_models.randomize_adapters(model, std=0.3)
    with torch.no_grad():
        if "modules_to_save" in overrides:
            model.lm_head.modules_to_save["default"].weight.add_(0.5)
        if "trainable_token_indices" in overrides:
            model.model.embed_tokens.modules_to_save["default"].values.add_(0.5)
    lorakit.save_adapter(model, directory)
    logits = logits_of(model)
    return logits, logits_of(lorakit.merge_and_unload(model))


def _trained(build, directory: Path, **overrides) -> tuple[torch.nn.Module, dict]:
    """``build()`` with a new adapter trained 2 SGD steps (same seed), saved in ``directory``:
    ``(model, its saved tensors)``."""
    model = build()
    torch.manual_seed(5)
    lorakit.inject(model, _config(init_lora_weights="gaussian", **overrides))
    tiny_models.sgd_steps(model, tiny_models.input_ids(), steps=2, lr=0.5)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (every base weight is read: no "unrecorded")
        lorakit.save_adapter(model, directory)
    return model, load_file(directory / "adapter_model.safetensors")


def _assert_trained_alike(plain, offloaded, changed_key: str) -> None:
    """The two ``_trained`` results hold the same tensors and give the same logits; the
    tensor ``changed_key`` names (the head copy, the token rows) was trained."""
    assert plain[1].keys() == offloaded[1].keys()
    for key, value in offloaded[1].items():
        assert (value - plain[1][key]).abs().max().item() <= TOL, key
    changed = [key for key in plain[1] if changed_key in key]
    assert changed
    assert_close(logits_of(offloaded[0]), logits_of(plain[0]))


# ---------------------------------------------------------------- 1. modules_to_save
def test_a_saved_copy_of_an_offloaded_head_loads_and_merges_like_the_plain_model(
    offloaded, tmp_path
) -> None:
    want, want_merged = _saved_adapter(tmp_path / "adapter", modules_to_save=["lm_head"])
    model = offloaded()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(model, tmp_path / "adapter")
    copy = model.lm_head.modules_to_save["default"]
    assert copy.weight.device == torch.device("cpu")  # the execution device, not meta
    assert model.lm_head.original_module.weight.is_meta  # the original stays offloaded
    assert_close(logits_of(model), want)
    assert_close(logits_of(lorakit.merge_and_unload(model)), want_merged)


def test_training_a_saved_copy_of_an_offloaded_head_matches_the_plain_model(
    offloaded, tmp_path
) -> None:
    plain = _trained(lambda: tiny_models.llama(seed=0), tmp_path / "p", modules_to_save=["lm_head"])
    model = _trained(offloaded, tmp_path / "o", modules_to_save=["lm_head"])
    assert model[0].lm_head.modules_to_save["default"].weight.grad is not None
    _assert_trained_alike(plain, model, "lm_head.weight")
    head = plain[0].lm_head
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
    unloaded = lorakit.unload(model[0])  # the original: its offload map was not trained
    assert_close(logits_of(unloaded), logits_of(tiny_models.llama(seed=0)))


# ---------------------------------------------------------------- 2. a hook on a parent module
def _parent_offloaded() -> torch.nn.Module:
    model = tiny_models.llama(seed=0)
    cpu_offload(
        model, execution_device=torch.device("cpu"), preload_module_classes=["LlamaDecoderLayer"]
    )
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    return model


@pytest.mark.parametrize(
    ("overrides", "module"),
    [
        ({}, "model.layers.0.self_attn.q_proj"),
        (
            {
                "target_modules": ["lm_head"],
                "modules_to_save": ["layers.1.post_attention_layernorm"],
            },
            "model.layers.1.post_attention_layernorm",
        ),
    ],
)
def test_inject_under_a_parent_offload_hook_is_refused_before_any_change(overrides, module) -> None:
    model = _parent_offloaded()
    want = logits_of(model)
    with pytest.raises(ValueError, match="preload_module_classes") as caught:
        lorakit.inject(model, _config(**overrides))
    message = str(caught.value)
    parent = ".".join(module.split(".")[:3])
    assert f"module {module!r} lies inside {parent!r}" in message
    assert "Offload without preload_module_classes" in message and "Nothing was changed" in message
    assert not lorakit.adapter_configs(model) and not list(lora_layers(model))
    assert_close(logits_of(model), want)


def test_load_adapter_under_a_parent_offload_hook_is_refused_before_any_change(tmp_path) -> None:
    _saved_adapter(tmp_path / "adapter")
    model = _parent_offloaded()
    want = logits_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the base check's warning
        with pytest.raises(AdapterFileError, match=re.escape("lies inside 'model.layers.0'")):
            lorakit.load_adapter(model, tmp_path / "adapter")
        with pytest.raises(AdapterFileError, match="preload_module_classes"):
            lorakit.PeftModel.from_pretrained(model, tmp_path / "adapter")
    assert not lorakit.adapter_configs(model) and not list(lora_layers(model))
    assert_close(logits_of(model), want)


def test_the_unverified_note_names_a_parent_offload_hook_not_a_missing_map() -> None:
    model = lorakit.inject(tiny_models.llama(seed=0), _config())  # injected, then offloaded
    cpu_offload(
        model, execution_device=torch.device("cpu"), preload_module_classes=["LlamaDecoderLayer"]
    )
    names = [name for name, _ in lora_layers(model)]
    note = base_verdicts.unverified_note(model, {}, "a", names)
    assert "parent module ('model.layers.0'" in note and "preload_module_classes" in note
    assert "no accelerate offload map" not in note


# ---------------------------------------------------------------- 3. trainable tokens
def test_token_rows_on_an_offloaded_embedding_load_and_merge_like_the_plain_model(
    offloaded, tmp_path
) -> None:
    want, want_merged = _saved_adapter(tmp_path / "adapter", trainable_token_indices=TOKENS)
    model = offloaded()
    lorakit.load_adapter(model, tmp_path / "adapter")
    rows = model.model.embed_tokens.modules_to_save["default"].values
    assert rows.device == torch.device("cpu")
    assert_close(logits_of(model), want)
    assert model.model.embed_tokens.weight.is_meta  # offloaded again after the call
    merged = lorakit.merge_and_unload(model)
    assert merged.model.embed_tokens.weight.is_meta
    assert_close(logits_of(merged), want_merged)
    assert_close(logits_of(merged), want_merged)  # each call loads the embedding with its rows


def test_training_token_rows_on_an_offloaded_embedding_matches_the_plain_model(
    offloaded, tmp_path
) -> None:
    plain = _trained(
        lambda: tiny_models.llama(seed=0), tmp_path / "p", trainable_token_indices=TOKENS
    )
    model = _trained(offloaded, tmp_path / "o", trainable_token_indices=TOKENS)
    _assert_trained_alike(plain, model, "trainable_tokens_delta")
    rows = model[0].model.embed_tokens.modules_to_save["default"].values
    base_rows = tiny_models.llama(seed=0).model.embed_tokens.weight[TOKENS]
    assert (rows - base_rows).abs().max().item() > 1e-3  # (trained: they moved)


# ---------------------------------------------------------------- 4. unmerge after offloading
def test_unmerge_on_a_model_offloaded_after_its_merge_restores_w0(tmp_path) -> None:
    want, _ = _saved_adapter(tmp_path / "adapter")
    model = tiny_models.llama(seed=0)
    lorakit.load_adapter(model, tmp_path / "adapter")
    lorakit.merge(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert_close(logits_of(model), want)
    lorakit.unmerge(model)
    for _ in range(2):
        assert_close(logits_of(model), want)
    plain = tiny_models.llama(seed=0)
    for path, layer in lora_layers(model):
        assert not layer.merged_adapters and layer.base_layer.weight.is_meta, path
        original = plain.get_submodule(path).weight
        assert torch.equal(layer.base_layer._hf_hook.weights_map["weight"], original), path
    with lorakit.disabled(model):
        assert_close(logits_of(model), logits_of(plain))


def test_unmerge_after_offloading_puts_back_a_conv1d_bias_merged_from_b(tmp_path) -> None:
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True
    )
    model = lorakit.inject(tiny_models.gpt2(seed=0), config)
    tiny_models.randomize_adapters(model, std=0.3)
    want = logits_of(model)
    lorakit.merge(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    lorakit.unmerge(model)
    assert_close(logits_of(model), want)
    attention = model.transformer.h[0].attn.c_attn
    original = tiny_models.gpt2(seed=0).transformer.h[0].attn.c_attn.bias
    assert torch.equal(attention.base_layer._hf_hook.weights_map["bias"], original)


def test_leaving_out_merged_adapters_of_a_layer_offloaded_after_its_merge_is_refused() -> None:
    model = lorakit.inject(tiny_models.llama(seed=0), _config())
    tiny_models.randomize_adapters(model, std=0.3)
    want = logits_of(model)
    lorakit.merge(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    with lorakit.disabled(model), pytest.raises(ValueError, match="Unmerge first"):
        logits_of(model)  # (it gave the merged model's logits)
    assert_close(logits_of(model), want)
    lorakit.unmerge(model)
    with lorakit.disabled(model):
        assert_close(logits_of(model), logits_of(tiny_models.llama(seed=0)))


def test_a_delete_that_merges_back_into_an_offloaded_layer_is_refused(tmp_path) -> None:
    model = lorakit.inject(tiny_models.llama(seed=0), _config())
    lorakit.inject(model, _config(), "other")
    tiny_models.randomize_adapters(model, std=0.3)
    lorakit.set_active(model, ["default", "other"])
    lorakit.merge(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    want = logits_of(model)
    with pytest.raises(ValueError, match="offloaded this layer after the merge"):
        lorakit.delete_adapter(model, "other")
    assert set(lorakit.adapter_configs(model)) == {"default", "other"}
    assert all(layer.merged_adapters == ("default", "other") for _, layer in lora_layers(model))
    assert_close(logits_of(model), want)


# ---------------------------------------------------------------- 5. one read per weight
TARGET_PATHS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def test_load_adapter_reads_each_disk_offloaded_weight_once(tmp_path, monkeypatch) -> None:
    _saved_adapter(tmp_path / "adapter")
    other = tiny_models.llama(seed=0)  # layer 1 (on "disk" below) from another base
    other.model.layers[1].load_state_dict(tiny_models.llama(seed=1).model.layers[1].state_dict())
    lorakit.save_adapter(lorakit.inject(other, _config()), tmp_path / "other")
    reads: list[str] = []
    read = accelerate_offload.OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(
        accelerate_offload.OffloadedWeightsLoader,
        "__getitem__",
        lambda loader, key: reads.append(key) or read(loader, key),
    )
    model = _device_mapped(tmp_path)
    reads.clear()
    lorakit.load_adapter(model, tmp_path / "adapter")
    targeted = sorted(key for key in reads if key.startswith("model.layers.1."))
    assert targeted == sorted(f"model.layers.1.{path}.weight" for path in TARGET_PATHS)
    mismatch = "module 'model.layers.1.self_attn.q_proj' does not match"  # (read, and checked)
    with pytest.raises(BaseModelMismatchError, match=re.escape(mismatch)):
        lorakit.load_adapter(_device_mapped(tmp_path), tmp_path / "other")
