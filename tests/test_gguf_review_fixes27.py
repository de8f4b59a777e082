"""GGUF export review fixes (round 27): a merge that fails is a one-line error; an existing
``--output`` is refused unless ``--overwrite``; configs llama.cpp would compute otherwise
(non-SiLU ``hidden_act``, sliding windows) and still-quantized models are refused; ``--gguf-pre``
must be a name llama.cpp knows; a GGUF ``output.weight`` LoRA onto a tied model says so; an
adapter made for another model class (``auto_mapping.base_model_class``) is refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import (
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError, UserError
from lorakit.export import gguf_tokenizer
from lorakit.export.gguf_adapter import export_adapter
from lorakit.export.gguf_model import export_model
from tests import tiny_models, tiny_tokenizer
from tests.gguf_helpers import SIZES, peft_adapter, reader_fields, reader_tensors, saved_adapter


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------- 1. a merge lorakit refuses
def test_a_failing_merge_is_a_one_line_error_and_writes_nothing(model_dir, tmp_path, capsys):
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()  # Linears without a bias
    peft_adapter(tmp_path / "bias", base, lora_bias=True)
    output = tmp_path / "merged.gguf"
    args = ["export", str(model_dir), "--adapter", str(tmp_path / "bias"), "--format", "gguf"]
    code = main([*args, "--output", str(output)])
    error = capsys.readouterr().err.splitlines()[-1]  # (after transformers' progress bars)
    assert code == 2
    assert error.startswith("lorakit: error: cannot merge: ")
    assert "lora_B" in error and "q_proj" in error
    assert "use the adapter unmerged" not in error
    assert not output.exists()


# ------------------------------------------------------------- 2. an existing --output
def adapter_export_args(adapter, model_dir, output) -> list[str]:
    args = ["export", str(adapter), "--format", "gguf", "--model", str(model_dir)]
    return [*args, "--output", str(output)]


def test_an_existing_output_is_refused_without_overwrite(model_dir, tmp_path, capsys):
    _, adapter = saved_adapter(tmp_path / "adapter", tiny_models.llama())
    output = tmp_path / "base.gguf"
    output.write_bytes(b"GGUF a model file that must survive")
    before = output.read_bytes()
    assert main(adapter_export_args(adapter, model_dir, output)) == 2
    error = capsys.readouterr().err
    assert f"--output {output} already exists" in error and "--overwrite" in error
    assert output.read_bytes() == before


def test_overwrite_replaces_the_output_with_the_export(model_dir, tmp_path):
    base = tiny_models.llama()
    adapted, adapter = saved_adapter(tmp_path / "adapter", base)
    output = tmp_path / "base.gguf"
    output.write_bytes(b"GGUF a model file to replace")
    assert main([*adapter_export_args(adapter, model_dir, output), "--overwrite"]) == 0
    assert reader_fields(output)["general.type"] == "adapter"
    layer = adapted.model.layers[0].self_attn.v_proj
    # alpha 8 / r 4 on every module: the file keeps B as it is (no folding), v rows unpermuted
    np.testing.assert_array_equal(
        reader_tensors(output)["blk.0.attn_v.weight.lora_b"],
        layer.lora_B["default"].weight.detach().double().numpy(),
    )
    assert not list(tmp_path.glob(".base.gguf.*"))  # the atomic write left no temporary


# ------------------------------------------------------------- 3. configs llama.cpp ignores
def mistral_with_window(window: int) -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SIZES, sliding_window=window)).eval()


def qwen2_with(**fields) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, **fields)).eval()


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (
            lambda: LlamaForCausalLM(tiny_models.llama_config(hidden_act="gelu")),
            "hidden_act='gelu'",
        ),
        (lambda: mistral_with_window(4), "sliding_window=4"),
        (
            lambda: qwen2_with(use_sliding_window=True, sliding_window=4, max_window_layers=0),
            "use_sliding_window=True",
        ),
        (
            lambda: qwen2_with(
                sliding_window=4, layer_types=["full_attention", "sliding_attention"]
            ),
            "'sliding_attention' at layers [1]",
        ),
    ],
)
def test_configs_llama_cpp_computes_otherwise_are_refused(build, named, tmp_path):
    output = tmp_path / "m.gguf"
    with pytest.raises(UserError, match=r"llama\.cpp") as refused:
        export_model(build(), output, "f32")
    assert named in str(refused.value)
    assert not output.exists()


@pytest.mark.parametrize(
    "build", [tiny_models.llama, lambda: mistral_with_window(SIZES["max_position_embeddings"])]
)
def test_silu_models_without_a_window_still_export(build, tmp_path):
    model = build()
    export_model(model, tmp_path / "m.gguf", "f32")
    tensors = reader_tensors(tmp_path / "m.gguf")
    np.testing.assert_array_equal(
        tensors["blk.1.ffn_down.weight"],
        model.model.layers[1].mlp.down_proj.weight.detach().double().numpy(),
    )


# ------------------------------------------------------------- 4. --gguf-pre names
def test_an_unknown_gguf_pre_is_refused_with_close_names(model_dir, tmp_path, capsys):
    output = tmp_path / "m.gguf"
    args = ["export", str(model_dir), "--format", "gguf", "--gguf-pre", "smolm"]
    assert main([*args, "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert "--gguf-pre 'smolm'" in error and "smollm" in error
    assert not output.exists()
    with pytest.raises(UserError, match="did you mean gpt-2"):
        gguf_tokenizer.tokenizer_keys(tiny_tokenizer.build(), 300, pre_tokenizer="gpt2")


def test_a_known_gguf_pre_is_written(model_dir, tmp_path):
    output = tmp_path / "m.gguf"
    args = ["export", str(model_dir), "--format", "gguf", "--gguf-pre", "llama3"]
    assert main([*args, "--output", str(output)]) == 0
    assert reader_fields(output)["tokenizer.ggml.pre"] == "llama3"
    assert {
        "gpt-2",
        "llama-bpe",
        "qwen2",
        "smollm",
        "default",
    } <= gguf_tokenizer.LLAMA_CPP_PRE_TOKENIZERS
    gguf_tokenizer.check_pre_tokenizer_name("qwen2")  # (no error)


@pytest.mark.slow
def test_llama_cpp_loads_every_known_pre_and_refuses_another(tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = tiny_tokenizer.build()
    config = tiny_models.llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setattr(gguf_tokenizer, "check_pre_tokenizer_name", lambda name: None)
    refused = []
    for name in [*sorted(gguf_tokenizer.LLAMA_CPP_PRE_TOKENIZERS), "smolm"]:
        path = tmp_path / "m.gguf"
        export_model(model, path, "f32", tokenizer=tokenizer, pre_tokenizer=name)
        try:
            llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).close()
        except ValueError:
            refused.append(name)
    assert refused == ["smolm"]


# ------------------------------------------------------------- 5. a still-quantized model
def test_a_quantized_model_is_refused_and_its_merge_exports(model_dir, tmp_path):
    from lorakit.models import load_model

    model, _ = load_model(model_dir, quantization="int8-rows", progress=False)
    with pytest.raises(UserError, match=r"quantized layers \(model\.layers\.0\.self_attn\.q_proj"):
        export_model(model, tmp_path / "q.gguf", "f32")
    assert not (tmp_path / "q.gguf").exists()
    # the advice: merge_and_unload dequantizes (W = dequant(W0) + s B A), and that exports
    adapted = lorakit.inject(
        model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])
    )
    tiny_models.randomize_adapters(adapted, std=0.2)
    merged = lorakit.merge_and_unload(adapted)
    export_model(merged, tmp_path / "m.gguf", "f32")
    np.testing.assert_allclose(
        reader_tensors(tmp_path / "m.gguf")["blk.0.attn_v.weight"],
        merged.model.layers[0].self_attn.v_proj.weight.detach().double().numpy(),
        rtol=0,
        atol=0,
    )


# ------------------------------------------------------------- 6. output.weight onto a tied model
def test_an_output_lora_onto_a_tied_model_says_the_head_is_tied(tmp_path):
    base = tiny_models.llama()
    adapted, adapter = saved_adapter(
        tmp_path / "adapter", base, target_modules=["q_proj", "lm_head"]
    )
    export_adapter(adapter, base, tmp_path / "a.gguf")
    torch.manual_seed(0)
    tied = LlamaForCausalLM(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    with pytest.raises(AdapterFileError, match="ties lm_head to the token embedding") as refused:
        lorakit.load_adapter(tied, tmp_path / "a.gguf")
    assert "untied lm_head" in str(refused.value) and "output.weight" in str(refused.value)
    # onto the untied base it was made for, it loads and gives the adapter's outputs
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a.gguf")
    ids = tiny_models.input_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- 8. auto_mapping.base_model_class
def test_an_adapter_for_another_model_class_is_refused(model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()
    peft_model = peft_adapter(tmp_path / "qwen2", qwen2)  # no task_type: auto_mapping written
    fields = json.loads((tmp_path / "qwen2" / "adapter_config.json").read_text())
    assert fields["auto_mapping"]["base_model_class"] == "Qwen2ForCausalLM"
    output = tmp_path / "a.gguf"
    with pytest.raises(UserError, match="made for a Qwen2ForCausalLM") as refused:
        export_adapter(tmp_path / "qwen2", tiny_models.llama(), output)  # same sizes, Llama
    assert "LlamaForCausalLM" in str(refused.value)
    assert main(adapter_export_args(tmp_path / "qwen2", model_dir, output)) == 2
    assert f"--model {model_dir} is a LlamaForCausalLM" in capsys.readouterr().err
    assert not output.exists()
    # with its own base it exports PEFT's factors (alpha / r = 2 everywhere: B kept as it is)
    export_adapter(tmp_path / "qwen2", qwen2, output)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    tensors = reader_tensors(output)
    np.testing.assert_array_equal(
        tensors["blk.0.attn_q.weight.lora_a"],
        layer.lora_A["default"].weight.detach().double().numpy(),
    )
    np.testing.assert_array_equal(
        tensors["blk.0.attn_q.weight.lora_b"],
        layer.lora_B["default"].weight.detach().double().numpy(),
    )
