"""Save / load round trips: PEFT key names and config text, reload gives identical outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io import load_adapter, read_adapter, save_adapter
from tests import tiny_models
from tests.call_count import calls_made

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
TARGETS = {
    "llama": "all-linear",
    "gpt2": ["c_attn", "wte"],
    "bert": ["query", "value", "word_embeddings"],
}


def _adapted(arch: str, **fields) -> torch.nn.Module:
    fields = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": TARGETS[arch],
        "task_type": TASK[arch],
    } | fields
    model = lorakit.inject(tiny_models.BUILDERS[arch](), lorakit.LoraConfig(**fields))
    tiny_models.randomize_adapters(model, std=0.3)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_round_trip_onto_a_plain_model_gives_identical_outputs(arch, tmp_path) -> None:
    model = _adapted(arch)
    save_adapter(model, tmp_path)
    fresh = tiny_models.BUILDERS[arch]()
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh), _logits(model))
    assert lorakit.active_adapters(fresh) == ("default",)
    assert not torch.equal(_logits(fresh), _logits(tiny_models.BUILDERS[arch]()))


def test_file_keys_shapes_and_config_text_are_peft_s(tmp_path) -> None:
    model = _adapted("gpt2")
    save_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        keys = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 64)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (192, 4)
    assert keys["base_model.model.transformer.wte.lora_embedding_A"] == (4, 128)
    assert keys["base_model.model.transformer.wte.lora_embedding_B"] == (64, 4)
    assert len(keys) == 6  # no base embedding: the vocabulary was not resized
    assert metadata["format"] == "pt"
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True)
    assert config["fan_in_fan_out"] is True  # Conv1D, as peft writes it
    assert config["target_modules"] == ["c_attn", "wte"]
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)


def test_all_linear_is_written_as_module_names(tmp_path) -> None:
    save_adapter(_adapted("llama"), tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = sorted(
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in range(2)
        for p in projections
    )
    assert written == expected  # 14 < 20 targets: full names, no lm_head


def test_other_adapters_go_to_subdirectories_and_load_by_name(tmp_path) -> None:
    model = _adapted("llama", target_modules=["q_proj"])
    lorakit.inject(
        model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]), "second"
    )
    tiny_models.randomize_adapters(model, seed=5, std=0.3)
    save_adapter(model, tmp_path)
    save_adapter(model, tmp_path, "second")
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    fresh = tiny_models.llama()
    load_adapter(fresh, tmp_path)
    load_adapter(fresh, tmp_path, "second", subfolder="second")  # (as in PEFT)
    assert lorakit.active_adapters(fresh) == ("default",)  # loading does not switch adapters
    for names in (["default"], ["second"], ["default", "second"]):
        with lorakit.use_adapters(model, names), lorakit.use_adapters(fresh, names):
            assert torch.equal(_logits(fresh), _logits(model))


def test_adapters_on_the_same_modules_load_side_by_side(tmp_path) -> None:
    """A second file on the same layers joins the existing LoRA layers (never re-wraps them,
    which would drop the first adapter)."""
    first, second = _adapted("llama"), _adapted("llama")
    tiny_models.randomize_adapters(second, seed=9, std=0.3)
    save_adapter(first, tmp_path / "first")
    save_adapter(second, tmp_path / "second")
    fresh = tiny_models.llama()
    load_adapter(fresh, tmp_path / "first", "one")
    load_adapter(fresh, tmp_path / "second", "two")
    layer = fresh.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.adapter_names == ("one", "two") and not isinstance(
        layer.base_layer, lorakit.layers.LoraLayer
    )
    for name, source in (("one", first), ("two", second)):
        expected = _logits(source)
        with lorakit.use_adapters(fresh, [name]):
            assert torch.equal(_logits(fresh), expected)
    assert not torch.equal(_logits(first), _logits(second))


def test_read_adapter_returns_config_and_tensors(tmp_path) -> None:
    model = _adapted("bert")
    save_adapter(model, tmp_path)
    adapter = read_adapter(tmp_path)
    assert adapter.config.r == 4 and adapter.config.target_modules == TARGETS["bert"]
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    layer = model.get_submodule("bert.encoder.layer.1.attention.self.value")
    assert torch.equal(adapter.tensors[key], layer.lora_B["default"].weight)
    assert "base_model.model.classifier.weight" in adapter.tensors  # SEQ_CLS head saved in full
    assert adapter.fingerprint is not None


def test_bf16_save_dtype_and_load_into_fp32_adapter(tmp_path) -> None:
    model = _adapted("llama")
    save_adapter(model, tmp_path, dtype=torch.bfloat16)
    adapter = read_adapter(tmp_path)
    assert {t.dtype for t in adapter.tensors.values()} == {torch.bfloat16}
    fresh = tiny_models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(fresh, tmp_path)
    layer = fresh.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A["default"].weight.dtype == torch.float32
    original = model.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].weight
    assert torch.equal(layer.lora_A["default"].weight, original.to(torch.bfloat16).float())


def test_saving_twice_gives_identical_bytes(tmp_path) -> None:
    model = _adapted("bert", bias="all")
    save_adapter(model, tmp_path / "one")
    save_adapter(model, tmp_path / "two")
    save_adapter(model, tmp_path / "two")  # overwriting in place too
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temporary file left behind


_SAVE_IN_A_FRESH_PROCESS = """
import sys
sys.path.insert(0, sys.argv[2])
import torch, lorakit
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))
config = lorakit.LoraConfig(r=2, target_modules=["1", "0"], rank_pattern={"1": 3, "0": 4},
                            alpha_pattern={"1": 5.0, "0": 6.0})
lorakit.save_adapter(lorakit.inject(model, config), sys.argv[1])
"""


@pytest.mark.slow
def test_bytes_do_not_depend_on_the_process_or_its_hash_seed(tmp_path) -> None:
    """Two fresh interpreters with different PYTHONHASHSEED (set and dict iteration orders of
    str keys change with it) write byte-identical files."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    for seed in ("1", "2"):
        subprocess.run(
            [sys.executable, "-c", _SAVE_IN_A_FRESH_PROCESS, str(tmp_path / seed), src],
            check=True,
            env=os.environ | {"PYTHONHASHSEED": seed},
        )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_loading_many_adapters_does_not_slow_down(tmp_path) -> None:
    """The 100th adapter costs what the first did: no per-load work that grows with the number of
    adapters already on the model (before the fix, set_active walked every parameter and module
    walks descended into every adapter: the 100th load took 3.5x the first)."""
    save_adapter(_adapted("llama"), tmp_path)
    model = tiny_models.llama()
    work = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in range(100):
            work.append(calls_made(load_adapter, model, tmp_path, f"adapter_{index}"))
    assert len(lorakit.adapter_configs(model)) == 100
    assert work[-1] <= 1.05 * work[1], (work[1], work[-1])


def _resized_llama(vocabulary: int = 136) -> torch.nn.Module:
    model = tiny_models.llama()
    model.resize_token_embeddings(vocabulary)
    torch.manual_seed(11)  # the new rows: "trained" values only the adapter file knows
    with torch.no_grad():
        model.model.embed_tokens.weight[128:].normal_()
        model.lm_head.weight[128:].normal_()
    return model


def test_base_embeddings_are_saved_only_for_a_resized_vocabulary(tmp_path) -> None:
    base_dir = tmp_path / "base"
    tiny_models.llama().save_pretrained(base_dir)  # the base's config.json says vocab 128
    config = lorakit.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], base_model_name_or_path=str(base_dir)
    )
    plain = lorakit.inject(tiny_models.llama(), config)
    save_adapter(plain, tmp_path / "plain")
    assert not any("base_layer.weight" in k for k in read_adapter(tmp_path / "plain").tensors)

    resized = lorakit.inject(_resized_llama(), config)
    tiny_models.randomize_adapters(resized, std=0.3)
    save_adapter(resized, tmp_path / "resized")  # detected from the base's config.json
    tensors = read_adapter(tmp_path / "resized").tensors
    assert tensors["base_model.model.model.embed_tokens.base_layer.weight"].shape == (136, 64)
    assert tensors["base_model.model.lm_head.weight"].shape == (136, 64)

    with pytest.raises(AdapterFileError, match=r"resize_token_embeddings\(136\)"):
        load_adapter(tiny_models.llama(), tmp_path / "resized")
    fresh = tiny_models.llama()
    fresh.resize_token_embeddings(136)  # new rows differ: the file's values replace them
    load_adapter(fresh, tmp_path / "resized")
    ids = tiny_models.input_ids(vocab=136, seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, resized(ids).logits)
        peft_fresh = tiny_models.llama()
        peft_fresh.resize_token_embeddings(136)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(peft_fresh, tmp_path / "resized")
        assert (theirs(ids).logits - resized(ids).logits).abs().max().item() <= 1e-5
