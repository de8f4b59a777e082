"""Full GGUF model export, checked by two readers that are not lorakit's: the ``gguf`` package
(tensors, keys) and transformers' GGUF loader (which undoes llama.cpp's q/k permutation itself
and rebuilds the model, so equal logits mean the file is the model)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.export.gguf_model import export_model
from tests import tiny_models, tiny_tokenizer
from tests.gguf_helpers import (
    BUILDERS,
    reader_fields,
    reader_tensors,
    saved_adapter,
    transformers_row_order,
    with_trained_copy,
)

LAYER_NAMES = {  # transformers parameter -> GGUF tensor, as llama.cpp names them
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_names(blocks: int = 2) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for block in range(blocks):
        for ours, theirs in LAYER_NAMES.items():
            names[f"model.layers.{block}.{ours}"] = f"blk.{block}.{theirs}"
    return names


def transformers_logits(directory, file_name: str) -> torch.Tensor:
    """Logits of the model transformers rebuilds from the GGUF file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=file_name, dtype=torch.float32
        )
    with torch.no_grad():
        return model.eval()(tiny_models.input_ids()).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


def test_f32_export_reads_back_equal_weights(tmp_path) -> None:
    model = tiny_models.llama()
    path = export_model(model, tmp_path / "m.gguf", "f32")
    arrays = reader_tensors(path)
    names = gguf_names()
    assert set(arrays) == set(names.values())
    for parameter, tensor in model.state_dict().items():
        stored = arrays[names[parameter]]
        if names[parameter].split(".")[-2] in ("attn_q", "attn_k"):
            assert not np.array_equal(stored, tensor.double().numpy())  # rows are reordered...
            stored = transformers_row_order(stored, names[parameter], model.config)
        np.testing.assert_array_equal(stored, tensor.double().numpy())  # ...and exact
    fields = reader_fields(path)
    expected = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.file_type": 0,
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.context_length": 128,
        "llama.vocab_size": 128,
        "llama.rope.freq_base": 10000.0,
    }
    assert {key: fields[key] for key in expected} == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_transformers_rebuilds_the_same_model_from_the_file(tmp_path, arch) -> None:
    model = BUILDERS[arch]()
    export_model(model, tmp_path / "m.gguf", "f32")
    torch.testing.assert_close(
        transformers_logits(tmp_path, "m.gguf"), logits(model), rtol=0, atol=1e-6
    )


def test_tied_embeddings_leave_out_the_output_tensor(tmp_path) -> None:
    torch.manual_seed(0)
    tied = type(tiny_models.llama())(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    export_model(tied, tmp_path / "m.gguf", "f32")
    assert "output.weight" not in reader_tensors(tmp_path / "m.gguf")
    torch.testing.assert_close(
        transformers_logits(tmp_path, "m.gguf"), logits(tied), rtol=0, atol=1e-6
    )


def tied_model_with_trained_copy(module: str):
    """``(adapted, merged)``: the tiny Llama with tied embeddings and an adapter whose
    ``modules_to_save=[module]`` copy is trained (moved away from the tied matrix); the merge
    unties ``lm_head`` from ``embed_tokens`` while the config says tied."""
    torch.manual_seed(0)
    tied = type(tiny_models.llama())(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    adapted = with_trained_copy(tied, module)
    merged = lorakit.merge_and_unload(copy.deepcopy(adapted))
    merged.config.tie_word_embeddings = True  # what the merge leaves (the export must not trust)
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    return adapted, merged


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_tied_model_untied_by_its_adapter_writes_the_output_tensor(tmp_path, module) -> None:
    """A trained ``modules_to_save`` copy of ``lm_head`` (or ``embed_tokens``) on a tied model:
    the merged head is no longer the embedding, so the file must hold it as ``output.weight``
    (llama.cpp reads ``token_embd`` for the output only when ``output.weight`` is absent)."""
    adapted, merged = tied_model_with_trained_copy(module)
    export_model(merged, tmp_path / "m.gguf", "f32")
    arrays = reader_tensors(tmp_path / "m.gguf")
    np.testing.assert_array_equal(
        arrays["output.weight"], merged.lm_head.weight.detach().double().numpy()
    )
    np.testing.assert_array_equal(
        arrays["token_embd.weight"], merged.model.embed_tokens.weight.detach().double().numpy()
    )
    assert not np.array_equal(arrays["output.weight"], arrays["token_embd.weight"])
    torch.testing.assert_close(logits(merged), logits(adapted), rtol=1e-5, atol=1e-5)


def test_tied_config_with_equal_separate_matrices_leaves_out_the_output_tensor(tmp_path) -> None:
    """Tied in the config and equal in value (e.g. loaded untied), though not one tensor: still
    one matrix for llama.cpp, so no ``output.weight``."""
    torch.manual_seed(0)
    tied = type(tiny_models.llama())(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    tied.lm_head.weight = torch.nn.Parameter(tied.model.embed_tokens.weight.detach().clone())
    export_model(tied, tmp_path / "m.gguf", "f32")
    assert "output.weight" not in reader_tensors(tmp_path / "m.gguf")


def test_merged_export_equals_the_unmerged_adapter(tmp_path) -> None:
    base = tiny_models.llama()
    adapted, _ = saved_adapter(
        tmp_path / "adapter",
        base,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 5},
    )
    unmerged = logits(adapted)
    export_model(lorakit.merge_and_unload(copy.deepcopy(adapted)), tmp_path / "m.gguf", "f32")
    torch.testing.assert_close(
        transformers_logits(tmp_path, "m.gguf"), unmerged, rtol=1e-5, atol=1e-5
    )
    assert (unmerged - logits(base)).abs().max() > 0.05  # the adapter changes the outputs


# per 32-value block: q8_0 rounds to max|x| / 127 steps, q4_0 to max|x| / 8 (its one-sided clamp)
BLOCK_ERROR = {"q8_0": 1 / 127, "q4_0": 1 / 8}
# (relative, absolute) rounding: f16 has subnormals below 2**-14 (steps of 2**-24)
FLOAT_ERROR = {"f16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 0.0)}


@pytest.mark.parametrize("tensor_type", ["f16", "bf16", "q8_0", "q4_0"])
def test_smaller_types_stay_within_their_rounding(tmp_path, tensor_type) -> None:
    import gguf

    model = tiny_models.llama()
    path = export_model(model, tmp_path / "m.gguf", tensor_type)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    arrays = reader_tensors(path)
    names = gguf_names()
    for parameter, tensor in model.state_dict().items():
        name = names[parameter]
        want = tensor.double().numpy()
        if name.split(".")[-2] in ("attn_q", "attn_k"):
            want = want[
                np.argsort(transformers_row_order(np.arange(want.shape[0]), name, model.config))
            ]
        got = arrays[name]
        if tensor.dim() == 1:
            assert types[name] == "F32" and np.array_equal(got, want)
            continue
        assert types[name] == tensor_type.upper()
        error = np.abs(got - want)
        if tensor_type in BLOCK_ERROR:
            block_max = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=2, keepdims=True)
            bound = np.broadcast_to(
                block_max * BLOCK_ERROR[tensor_type] * 1.01, (*block_max.shape[:2], 32)
            )
            assert (error <= bound.reshape(want.shape) + 1e-7).all(), name
        else:
            relative, absolute = FLOAT_ERROR[tensor_type]
            assert (error <= np.abs(want) * relative + absolute).all(), name
        assert error.max() > 0, name  # really stored in the smaller type


def test_tokenizer_keys_read_back_by_transformers(tmp_path) -> None:
    tokenizer = tiny_tokenizer.build()
    model = tiny_models.save_llama_with_tokenizer(tmp_path / "hf", tokenizer)
    export_model(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    fields = reader_fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # control, then normal
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Review: a warm, funny film<|im_end|> the lazy dog 42"
    assert rebuilt(text).input_ids == tokenizer(text).input_ids


def test_refusals(tmp_path) -> None:
    base = tiny_models.llama()
    adapted, _ = saved_adapter(tmp_path / "adapter", base)
    with pytest.raises(UserError, match="merge_and_unload it first"):
        export_model(adapted, tmp_path / "m.gguf")
    torch.manual_seed(0)
    scaled = type(base)(
        tiny_models.llama_config(
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
        )
    )
    with pytest.raises(UserError, match="rotary scaling 'linear'"):
        export_model(scaled, tmp_path / "m.gguf")
    with pytest.raises(UserError, match="choose one of"):
        export_model(base, tmp_path / "m.gguf", "q4_1")
    with pytest.raises(UserError, match="model_type='gpt2'"):
        export_model(tiny_models.gpt2(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_qwen2_whose_heads_do_not_span_the_hidden_size_is_refused(tmp_path) -> None:
    """llama.cpp's qwen2 loader takes q_proj / o_proj as hidden x hidden whatever
    ``attention.key_length`` says: a Qwen2 with head_dim * heads != hidden_size would be
    written and then fail to load there. Refused before anything is written."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.gguf_helpers import SIZES

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES, head_dim=32)).eval()
    with pytest.raises(UserError) as refused:
        export_model(model, tmp_path / "m.gguf", "f32")
    message = str(refused.value)
    for part in ("qwen2", "head_dim=32", "4 attention heads", "hidden_size=64", "llama.cpp"):
        assert part in message
    assert not (tmp_path / "m.gguf").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llama_and_mistral_with_a_wider_head_dim_are_written_with_key_length(
    tmp_path, arch
) -> None:
    """Llama's and Mistral's loaders read ``attention.key_length`` (q_proj hidden x heads *
    head_dim): these export, with the keys, and read back as the same model."""
    from transformers import MistralConfig, MistralForCausalLM

    from tests.gguf_helpers import SIZES

    torch.manual_seed(0)
    if arch == "llama":
        model = type(tiny_models.llama())(tiny_models.llama_config(head_dim=32)).eval()
    else:
        model = MistralForCausalLM(MistralConfig(**SIZES, head_dim=32)).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    export_model(model, tmp_path / "m.gguf", "f32")
    fields = reader_fields(tmp_path / "m.gguf")
    assert fields["llama.attention.key_length"] == 32
    assert fields["llama.attention.value_length"] == 32
    assert fields["llama.rope.dimension_count"] == 32
    arrays = reader_tensors(tmp_path / "m.gguf")
    assert arrays["blk.0.attn_q.weight"].shape == (128, 64)


def test_cli_exports_a_merged_model_and_an_adapter(tmp_path, model_dir, capsys) -> None:
    from lorakit.models import load_model

    base, _ = load_model(model_dir, progress=False)
    adapted, adapter = saved_adapter(tmp_path / "adapter", base, use_rslora=True)
    want = logits(adapted)
    merged_args = ["export", str(model_dir), "--adapter", str(adapter), "--format", "gguf"]
    assert main([*merged_args, "--type", "f32", "--output", str(tmp_path / "merged.gguf")]) == 0
    assert "merged with" in capsys.readouterr().out
    torch.testing.assert_close(
        transformers_logits(tmp_path, "merged.gguf"), want, rtol=1e-5, atol=1e-5
    )
    adapter_args = ["export", str(adapter), "--model", str(model_dir), "--format", "gguf"]
    assert main([*adapter_args, "--output", str(tmp_path / "a.gguf")]) == 0
    assert "8 modules, alpha 16" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = lorakit.load_adapter(
            load_model(model_dir, progress=False)[0], tmp_path / "a.gguf"
        )
    torch.testing.assert_close(logits(reloaded), want, rtol=1e-5, atol=1e-5)
    assert main([*adapter_args, "--output", str(tmp_path / "a.bin")]) == 2
    assert (
        main(
            [
                "export",
                str(model_dir),
                "--format",
                "gguf",
                "--drop-unsupported",
                "--output",
                "x.gguf",
            ]
        )
        == 2
    )


@pytest.mark.integration
def test_smollm2_f32_export_equals_the_packaged_file(tmp_path) -> None:
    """The built-in SmolLM2 was converted from its Q4_1 GGUF; exported back as f32, every tensor
    equals the packaged file's dequantised values and the tokenizer keys are the file's."""
    from lorakit.models import builtin_gguf_file

    assert (
        main(
            [
                "export",
                "smollm2-135m-instruct",
                "--format",
                "gguf",
                "--type",
                "f32",
                "--output",
                str(tmp_path / "s.gguf"),
            ]
        )
        == 0
    )
    packaged = builtin_gguf_file("smollm2-135m-instruct")
    ours, theirs = reader_tensors(tmp_path / "s.gguf"), reader_tensors(packaged)
    assert set(ours) == set(theirs)
    for name, values in theirs.items():
        np.testing.assert_array_equal(ours[name], values, err_msg=name)
    ours_fields, theirs_fields = reader_fields(tmp_path / "s.gguf"), reader_fields(packaged)
    for key, value in theirs_fields.items():
        if key.startswith(("tokenizer.", "llama.")):
            assert ours_fields[key] == value, key
