"""Review 32, GGUF export: an adapter made on a bare decoder (``Qwen2Model``, ``LlamaModel``:
module paths ``layers.0.self_attn.q_proj``, no ``model.`` prefix) exported over the matching
CausalLM was refused with "the Qwen2ForCausalLM given has no module 'layers.0.self_attn.q_proj';
give the adapter's base model", though the architecture is right. The refusal now says the paths
are rooted at the decoder and how to re-root them; following it exports the same tensors as the
same LoRA made on the CausalLM (read back with the ``gguf`` package)."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import UserError
from lorakit.export.gguf_adapter import export_adapter
from tests import tiny_models
from tests.gguf_helpers import mistral, peft_adapter, qwen2, reader_tensors, saved_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOTED = r"rooted at the decoder \(\S+, no 'model\.' prefix\)"


def _auto_mapping(directory) -> dict | None:
    return json.loads((directory / "adapter_config.json").read_text())["auto_mapping"]


def _reroot(source, target, old: str, new: str, base_class: str | None) -> None:
    """Copy the adapter in ``source`` to ``target`` with each key's ``base_model.model.{old}``
    made ``base_model.model.{new}`` and ``auto_mapping.base_model_class`` set (what the
    refusal tells a user to do, or its inverse)."""
    target.mkdir()
    tensors = load_file(source / "adapter_model.safetensors")
    head, renamed = f"base_model.model.{old}", {}
    for key, tensor in tensors.items():
        assert key.startswith(head), key
        renamed[f"base_model.model.{new}" + key[len(head) :]] = tensor
    save_file(renamed, target / "adapter_model.safetensors", metadata={"format": "pt"})
    fields = json.loads((source / "adapter_config.json").read_text())
    if base_class is not None:
        fields["auto_mapping"] = dict(fields["auto_mapping"] or {}, base_model_class=base_class)
    (target / "adapter_config.json").write_text(json.dumps(fields))


def test_a_peft_adapter_on_a_qwen2_decoder_says_its_paths_are_rooted_there(tmp_path) -> None:
    base = qwen2()
    peft_adapter(tmp_path / "bare", base.model)
    assert _auto_mapping(tmp_path / "bare")["base_model_class"] == "Qwen2Model"
    with pytest.raises(UserError) as caught:
        export_adapter(tmp_path / "bare", base, tmp_path / "a.gguf")
    message = str(caught.value)
    assert (
        "made on a Qwen2Model (adapter_config.json auto_mapping.base_model_class), a bare"
        in message
    )
    assert re.search(ROOTED, message), message
    assert "base_model.model.layers.N... -> base_model.model.model.layers.N..." in message
    assert "auto_mapping.base_model_class to Qwen2ForCausalLM" in message
    assert "has no module" not in message and "give the adapter's base model" not in message
    assert not (tmp_path / "a.gguf").exists()

    # Following it: the re-rooted file exports the 2 layers x (q, v) pairs, values unchanged.
    _reroot(tmp_path / "bare", tmp_path / "fixed", "", "model.", "Qwen2ForCausalLM")
    result = export_adapter(tmp_path / "fixed", base, tmp_path / "fixed.gguf")
    assert sorted(result.modules.values()) == sorted(
        f"blk.{i}.attn_{n}.weight" for i in (0, 1) for n in ("q", "v")
    )
    written = reader_tensors(tmp_path / "fixed.gguf")
    saved = load_file(tmp_path / "bare" / "adapter_model.safetensors")
    a = saved["base_model.model.layers.1.self_attn.v_proj.lora_A.weight"].double().numpy()
    np.testing.assert_array_equal(written["blk.1.attn_v.weight.lora_a"], a)


def test_a_lorakit_adapter_on_a_llama_decoder_is_refused_so_and_rerooted(tmp_path) -> None:
    """lorakit's own task-less file (auto_mapping LlamaModel): refused with the re-rooting
    advice; re-rooted as it says, it is byte for byte the export of the same LoRA made on the
    LlamaForCausalLM."""
    base = tiny_models.llama()
    _, made_on_causal = saved_adapter(tmp_path / "causal", base)
    _reroot(made_on_causal, tmp_path / "bare", "model.", "", "LlamaModel")
    with pytest.raises(
        UserError,
        match=rf"made on a LlamaModel .* {ROOTED}, where the "
        r"LlamaForCausalLM given keeps it under 'model'",
    ):
        export_adapter(tmp_path / "bare", base, tmp_path / "bare.gguf")
    assert not (tmp_path / "bare.gguf").exists()

    _reroot(tmp_path / "bare", tmp_path / "fixed", "", "model.", "LlamaForCausalLM")
    export_adapter(made_on_causal, base, tmp_path / "causal.gguf")
    export_adapter(tmp_path / "fixed", base, tmp_path / "fixed.gguf")
    causal, fixed = (
        reader_tensors(tmp_path / "causal.gguf"),
        reader_tensors(tmp_path / "fixed.gguf"),
    )
    assert sorted(fixed) == sorted(causal) and len(fixed) == 16  # 2 layers x 4 modules x (a, b)
    for name, values in causal.items():
        np.testing.assert_array_equal(fixed[name], values)
    assert (tmp_path / "fixed.gguf").read_bytes() == (tmp_path / "causal.gguf").read_bytes()


def test_a_mistral_decoder_adapter_over_a_llama_is_named_a_bare_decoder(tmp_path) -> None:
    """MistralModel is not the LlamaForCausalLM's own decoder class, but AutoModel's class for
    its config (same GGUF architecture 'llama'): the same refusal, not "no module"."""
    peft_adapter(tmp_path / "bare", mistral().model)
    with pytest.raises(UserError, match=rf"made on a MistralModel .* {ROOTED}") as caught:
        export_adapter(tmp_path / "bare", tiny_models.llama(), tmp_path / "a.gguf")
    assert "auto_mapping.base_model_class to LlamaForCausalLM" in str(caught.value)


def test_a_decoder_adapter_with_a_task_type_names_its_module(tmp_path) -> None:
    """With a task_type the file records no base class: the missing module, found in the
    given model's decoder, gets the same advice with its own path."""
    base = tiny_models.llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    adapted = lorakit.inject(copy.deepcopy(base.model), config)
    tiny_models.randomize_adapters(adapted, std=0.2)
    lorakit.save_adapter(adapted, tmp_path / "bare")
    assert _auto_mapping(tmp_path / "bare") is None
    with pytest.raises(UserError) as caught:
        export_adapter(tmp_path / "bare", base, tmp_path / "a.gguf")
    message = str(caught.value)
    assert "made on a bare decoder: its module paths are rooted at the decoder" in message
    assert "(layers.0.self_attn.q_proj, no 'model.' prefix)" in message
    assert "(model.layers.0.self_attn.q_proj)" in message
    assert "has no module" not in message and "auto_mapping" not in message
    _reroot(tmp_path / "bare", tmp_path / "fixed", "", "model.", None)
    result = export_adapter(tmp_path / "fixed", base, tmp_path / "fixed.gguf")
    assert sorted(result.modules.values()) == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]


def test_a_decoder_adapter_of_another_architecture_still_asks_for_its_base(tmp_path) -> None:
    """A Qwen2Model adapter over a Llama is of another architecture: the base-model refusal."""
    peft_adapter(tmp_path / "bare", qwen2().model)
    with pytest.raises(UserError, match=r"GGUF architecture 'qwen2'.*give the adapter's base"):
        export_adapter(tmp_path / "bare", tiny_models.llama(), tmp_path / "a.gguf")


def test_cli_refuses_a_decoder_adapter_with_the_rerooting_advice(
    tmp_path, model_dir, capsys
) -> None:
    from lorakit.cli import main
    from lorakit.models import load_model

    base, _ = load_model(model_dir, progress=False)
    peft_adapter(tmp_path / "bare", base.model)
    args = ["export", str(tmp_path / "bare"), "--model", str(model_dir), "--format", "gguf"]
    assert main([*args, "--output", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "made on a LlamaModel" in err and "rooted at the decoder" in err
    assert "auto_mapping.base_model_class to LlamaForCausalLM" in err
    assert not (tmp_path / "a.gguf").exists()


def test_a_bare_decoder_given_takes_a_bare_decoder_adapter_of_its_architecture(tmp_path):
    """A ``LlamaModel`` given: a ``MistralModel`` adapter's paths are rooted as its own (one
    GGUF architecture), so it exports as before (regression review: it was refused, with
    advice that would have broken the file)."""
    given = tiny_models.llama().model  # a LlamaModel
    peft_adapter(tmp_path / "bare", mistral().model)
    assert _auto_mapping(tmp_path / "bare")["base_model_class"] == "MistralModel"
    done = export_adapter(tmp_path / "bare", given, tmp_path / "a.gguf")
    assert done.path.exists()
