"""Adapters on a base offloaded by accelerate (session 34): ``cpu_offload`` and transformers'
``device_map`` with "cpu" / "disk" entries leave the offloaded parameters on the meta device
between forwards, their values in each module's ``AlignDevicesHook.weights_map``.

1. ``load_adapter`` / ``PeftModel.from_pretrained`` / ``inject`` put the adapter tensors on the
   hook's execution device (they were made on meta: NaN or base-only logits, a training step
   failed), and the forward calls the hooked base (the fused path read the meta weight): logits
   and a training step equal the non-offloaded model's, and ``save_adapter`` writes real values;
2. ``merge_and_unload`` loads each offloaded weight, merges it and writes the merged weight into
   the module's offload map (it raised on the meta weight); ``merge`` refuses such a layer, and a
   failing merge leaves the modules offloaded as they were;
3. what needs the base weight's values outside a forward (DoRA, PiSSA / OLoRA, a bare parameter)
   is refused with the way out, the model unchanged;
4. ``save_adapter``'s warning about unrecorded base weights no longer says "offloaded" (those are
   read): it fires for meta weights with no offload map only.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.io import read_adapter
from lorakit.state import lora_layers
from tests import offloaded_models, tiny_models

TARGETS = ["q_proj", "v_proj", "down_proj"]
DEVICE_MAP = {  # layer 1 on "disk" (offloaded), the rest on the CPU (the main device: not offloaded)
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
OFFLOADED = "model.layers.1.self_attn.q_proj"  # offloaded by both ways below
TOL = 1e-6


def _config(**overrides) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": TARGETS} | overrides))


def _device_mapped(tmp_path: Path) -> torch.nn.Module:
    return offloaded_models.device_mapped(tmp_path, DEVICE_MAP)


OFFLOADERS = {"cpu_offload": offloaded_models.cpu_offloaded, "device_map": _device_mapped}


@pytest.fixture(params=sorted(OFFLOADERS))
def offloaded(request, tmp_path):
    """A builder of the tiny Llama (seed 0) offloaded one way; its q_proj of layer 1 on meta."""

    def build() -> torch.nn.Module:
        model = OFFLOADERS[request.param](tmp_path)
        assert model.get_submodule(OFFLOADED).weight.is_meta
        return model

    return build


@pytest.fixture
def adapter(tmp_path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """``(directory, logits, merged logits)``: a random adapter on the plain tiny Llama, saved;
    its logits on ``tiny_models.input_ids()`` unmerged and after ``merge_and_unload``."""
    model = lorakit.inject(tiny_models.llama(seed=0), _config())
    tiny_models.randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        logits = model(tiny_models.input_ids()).logits
        merged = lorakit.merge_and_unload(model)(tiny_models.input_ids()).logits
    return tmp_path / "adapter", logits, merged


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= TOL


# ---------------------------------------------------------------- 1. adapters on the offloaded base
def test_a_loaded_adapter_lives_on_the_execution_device_and_gives_the_plain_logits(
    offloaded, adapter
) -> None:
    directory, want, _ = adapter
    model = offloaded()
    lorakit.load_adapter(model, directory)
    layer = model.get_submodule(OFFLOADED)
    assert [p.device.type for p in layer.adapter_parameters("default")] == ["cpu", "cpu"]
    assert layer.base_device == torch.device("cpu")
    _assert_close(_logits(model), want)
    assert layer.base_layer.weight.is_meta  # still offloaded after the forward


def test_peft_model_from_pretrained_on_an_offloaded_base_gives_the_plain_logits(
    offloaded, adapter
) -> None:
    directory, want, _ = adapter
    peft_model = lorakit.PeftModel.from_pretrained(offloaded(), directory)
    _assert_close(_logits(peft_model), want)


def test_training_on_an_offloaded_base_matches_the_plain_model_and_saves_real_values(
    offloaded, tmp_path
) -> None:
    ids = tiny_models.input_ids()
    trained = {}
    for label, build in (("plain", lambda: tiny_models.llama(seed=0)), ("offloaded", offloaded)):
        model = build()
        torch.manual_seed(5)
        lorakit.inject(model, _config(init_lora_weights="gaussian"))
        tiny_models.sgd_steps(model, ids, steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (every base weight is read: no "unrecorded")
            lorakit.save_adapter(model, tmp_path / label)
        trained[label] = (model, load_file(tmp_path / label / "adapter_model.safetensors"))
    plain, offloaded_model = trained["plain"], trained["offloaded"]
    fingerprints = {label: read_adapter(tmp_path / label).fingerprint for label in trained}
    assert fingerprints["offloaded"] == fingerprints["plain"]  # the offloaded weights' own
    assert plain[1].keys() == offloaded_model[1].keys()
    for key, value in offloaded_model[1].items():
        assert torch.isfinite(value).all() and value.abs().sum() > 0, key
        assert (value - plain[1][key]).abs().max().item() <= TOL, key
    _assert_close(_logits(offloaded_model[0]), _logits(plain[0]))


# ---------------------------------------------------------------- 2. merging
def test_merge_and_unload_writes_the_merged_weights_into_the_offload_map(
    offloaded, adapter
) -> None:
    directory, _, want = adapter
    model = offloaded()
    lorakit.load_adapter(model, directory)
    merged = lorakit.merge_and_unload(model)
    assert not list(lora_layers(merged))
    q_proj = merged.get_submodule(OFFLOADED)
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.is_meta  # offloaded still
    _assert_close(_logits(merged), want)
    _assert_close(_logits(merged), want)  # each forward loads the merged weight again


def test_a_device_mapped_merged_model_saves_and_reloads_merged(adapter, tmp_path) -> None:
    directory, _, want = adapter
    model = _device_mapped(tmp_path)
    lorakit.load_adapter(model, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "saving a model with offloaded modules"
        lorakit.merge_and_unload(model).save_pretrained(tmp_path / "merged")
    _assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), want)
    fresh = _device_mapped(tmp_path)  # the offload folder of the merged model was not rewritten
    _assert_close(_logits(fresh), _logits(tiny_models.llama(seed=0)))


def test_a_merged_offloaded_tied_embedding_is_untied_and_reloads_merged(tmp_path) -> None:
    torch.manual_seed(0)
    config = tiny_models.llama_config(tie_word_embeddings=True)
    tiny_models.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "base")
    lora = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    reference = lorakit.inject(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora)
    tiny_models.randomize_adapters(reference, std=0.3)
    lorakit.save_adapter(reference, tmp_path / "adapter")
    want = _logits(lorakit.merge_and_unload(reference))
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "lm_head": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, offloaded
    lorakit.load_adapter(model, tmp_path / "adapter")
    merged = lorakit.merge_and_unload(model)
    assert merged.config.tie_word_embeddings is False  # the head keeps the unmerged embedding
    _assert_close(_logits(merged), want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "saving a model with offloaded modules"
        merged.save_pretrained(tmp_path / "merged")
    _assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), want)


def test_merge_and_unload_folds_a_bias_on_b_into_an_offloaded_conv1d(tmp_path) -> None:
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True
    )
    reference = lorakit.inject(tiny_models.gpt2(seed=0), config)
    tiny_models.randomize_adapters(reference, std=0.3)
    lorakit.save_adapter(reference, tmp_path / "adapter")
    want = _logits(lorakit.merge_and_unload(reference))
    model = tiny_models.gpt2(seed=0)
    cpu_offload(model, execution_device=torch.device("cpu"))
    lorakit.load_adapter(model, tmp_path / "adapter")
    merged = lorakit.merge_and_unload(model)
    assert merged.transformer.h[0].attn.c_attn.bias.is_meta
    _assert_close(_logits(merged), want)


def test_merge_refuses_an_offloaded_layer_and_changes_nothing(offloaded, adapter) -> None:
    directory, want, _ = adapter
    model = offloaded()
    lorakit.load_adapter(model, directory)
    with pytest.raises(ValueError, match=r"offloaded by accelerate") as caught:
        lorakit.merge(model)
    message = str(caught.value)
    named = re.match(r"module '([\w.]+)': ", message).group(1)  # the first offloaded layer
    mapped = hasattr(model, "hf_device_map")  # (device_map: layer 0 is on the CPU, not offloaded)
    assert named == (OFFLOADED if mapped else "model.layers.0.self_attn.q_proj")
    assert "merge_and_unload" in message and "Nothing was changed" in message
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))
    _assert_close(_logits(model), want)


def test_a_failing_merge_and_unload_leaves_the_modules_offloaded(offloaded, adapter) -> None:
    directory, want, _ = adapter
    model = offloaded()
    lorakit.load_adapter(model, directory)
    factor = model.get_submodule("model.layers.1.mlp.down_proj").lora_B["default"].weight
    kept = factor[0, 0].item()  # (the layer after OFFLOADED: it is loaded when this one fails)
    with torch.no_grad():
        factor[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        lorakit.merge_and_unload(model)
    layer = model.get_submodule(OFFLOADED)
    assert layer.base_layer.weight.is_meta and not layer.merged_adapters
    with torch.no_grad():
        factor[0, 0] = kept
    _assert_close(_logits(model), want)


# ---------------------------------------------------------------- 3. refusals
@pytest.mark.parametrize(
    ("overrides", "what"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ],
)
def test_what_reads_the_offloaded_weight_is_refused_with_the_way_out(
    offloaded, overrides, what
) -> None:
    model = offloaded()
    want = _logits(model)
    with pytest.raises(ValueError, match="offloaded by accelerate") as caught:
        lorakit.inject(model, _config(**overrides))
    message = str(caught.value)
    assert what in message and "Load the base without offloading" in message
    assert "Nothing was changed" in message
    assert not lorakit.adapter_configs(model) and not list(lora_layers(model))
    _assert_close(_logits(model), want)


def test_an_adapter_on_an_offloaded_bare_parameter_is_refused() -> None:
    model = tiny_models.mixtral(seed=0)
    cpu_offload(model, execution_device=torch.device("cpu"))
    config = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]
    )
    with pytest.raises(ValueError, match=r"bare parameter \(target_parameters\).*MixtralExperts"):
        lorakit.inject(model, config)
    assert not lorakit.adapter_configs(model)


# ---------------------------------------------------------------- 4. the save warning's wording
def test_the_unrecorded_base_warning_names_a_meta_weight_with_no_offload_map(tmp_path) -> None:
    model = lorakit.inject(tiny_models.llama(seed=0), _config())
    layer = model.get_submodule(OFFLOADED).base_layer
    layer.weight = torch.nn.Parameter(torch.empty(layer.weight.shape, device="meta"))
    with pytest.warns(UserWarning, match="meta device") as caught:
        lorakit.save_adapter(model, tmp_path / "adapter")
    message = next(str(w.message) for w in caught if "meta device" in str(w.message))
    assert OFFLOADED in message and "no accelerate offload map" in message
    assert "(offloaded)" not in message


def test_a_hooked_base_that_is_not_offloaded_keeps_the_fused_path(monkeypatch) -> None:
    """accelerate hooks every module of a dispatched model (a multi-device device_map), with
    real weights where nothing is offloaded: those keep the fused LoRA path (the first fix
    left it for any hook), and give the same logits as the plain model."""
    from accelerate import dispatch_model

    from lorakit import fast

    calls = []
    fused = fast.fused_lora_linear
    monkeypatch.setattr(
        fast, "fused_lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k)
    )
    ids = tiny_models.input_ids()
    logits = {}
    for hooked in (False, True):
        model = tiny_models.llama(seed=0)
        if hooked:
            dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
            assert hasattr(model.get_submodule(OFFLOADED), "_hf_hook")
        lorakit.inject(model, _config(init_lora_weights=False, lora_dropout=0.1))
        calls.clear()
        model.train()
        torch.manual_seed(3)
        logits[hooked] = model(input_ids=ids).logits
        assert len(calls) == 2 * len(TARGETS)  # (2 layers x the targets: all fused)
    _assert_close(logits[True], logits[False])
