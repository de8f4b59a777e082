"""GGUF LoRA export, checked without llama.cpp: the ``gguf`` package reads the file back, and a
float64 reference of llama.cpp's formula (``y = W x + (alpha / r) B (A x)``, r = lora_b's
ne[0]), with q/k rows mapped back by transformers' inverse of llama.cpp's converter, must equal
lorakit's LoRA effect for every adapted module."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lorakit
from lorakit.errors import UserError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.state import lora_layers
from tests import tiny_models
from tests.gguf_helpers import (
    BUILDERS,
    qwen2,
    reader_fields,
    reader_tensors,
    saved_adapter,
    transformers_row_order,
)

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 6},
    "patterns": {"rank_pattern": {"v_proj": 2, "down_proj": 3}, "alpha_pattern": {"k_proj": 5}},
    "rslora+patterns": {
        "use_rslora": True,
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
}


def llama_cpp_effect(arrays, alpha, gguf_name, x, config, permuted):
    """llama.cpp's LoRA term for input rows ``x`` (n, in) in float64, output rows in
    transformers' order: ``(alpha / r) B (A x)`` with r = lora_b's ne[0]."""
    lora_a, lora_b = arrays[gguf_name + ".lora_a"], arrays[gguf_name + ".lora_b"]
    scale = alpha / lora_b.shape[1]  # numpy (out, r): ne[0] is r
    delta = scale * lora_b @ lora_a  # (out, in), rows in GGUF order
    if permuted and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        delta = transformers_row_order(delta, gguf_name, config)
    return x @ delta.T


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_cpp_formula_equals_lorakit_effect(tmp_path, arch, variant) -> None:
    base = BUILDERS[arch]()
    adapted, directory = saved_adapter(tmp_path / "adapter", base, **VARIANTS[variant])
    done = export_adapter(directory, base, tmp_path / "a.gguf")
    arrays, fields = reader_tensors(done.path), reader_fields(done.path)
    alpha = fields["adapter.lora.alpha"]
    permuted = arch != "qwen2"
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    checked = 0
    for name, layer in lora_layers(adapted):
        inputs = (
            x if layer.base_layer.in_features == 64 else torch.randn(5, 96, dtype=torch.float64)
        )
        with torch.no_grad():
            effect = (layer(inputs.float()) - layer.base_layer(inputs.float())).double().numpy()
        reference = llama_cpp_effect(
            arrays, alpha, done.modules[name], inputs.numpy(), base.config, permuted
        )
        np.testing.assert_allclose(
            effect, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max()
        )
        checked += 1
    assert checked == len(done.modules) == 8


def test_the_q_k_permutation_is_needed(tmp_path) -> None:
    """Without mapping llama.cpp's q rows back, the effect differs: the check above can fail."""
    base = tiny_models.llama()
    adapted, directory = saved_adapter(tmp_path / "adapter", base)
    done = export_adapter(directory, base, tmp_path / "a.gguf")
    arrays = reader_tensors(done.path)
    layer = dict(lora_layers(adapted))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        effect = (layer(x) - layer.base_layer(x)).double().numpy()
    unmapped = llama_cpp_effect(arrays, 8.0, "blk.0.attn_q.weight", x.double().numpy(), None, False)
    assert np.abs(effect - unmapped).max() > 0.1 * np.abs(effect).max()


def test_file_holds_the_keys_names_shapes_and_dtype_llama_cpp_reads(tmp_path) -> None:
    import gguf

    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base, rank_pattern={"down_proj": 3})
    done = export_adapter(directory, base, tmp_path / "a.gguf", tensor_type="f16")
    fields = reader_fields(done.path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    reader = gguf.GGUFReader(done.path)
    ne = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    kinds = {"attn_q": (64, 64), "attn_k": (64, 32), "attn_v": (64, 32), "ffn_down": (96, 64)}
    expected = {}
    for block in range(2):
        for kind, (fan_in, fan_out) in kinds.items():
            rank = 3 if kind == "ffn_down" else 4
            expected[f"blk.{block}.{kind}.weight.lora_a"] = [fan_in, rank]  # ne = [in, r]
            expected[f"blk.{block}.{kind}.weight.lora_b"] = [rank, fan_out]  # ne = [r, out]
    assert ne == expected
    assert {t.tensor_type.name for t in reader.tensors} == {"F16"}


def test_scales_folded_only_where_alpha_over_rank_differs(tmp_path) -> None:
    """rsLoRA with one rank: the file's alpha is alpha * sqrt(r), B stored unchanged; a module
    with another rank gets B * sqrt(r_m / r) (its s * r_m over the file's alpha)."""
    base = tiny_models.llama()
    adapted, directory = saved_adapter(
        tmp_path / "adapter", base, use_rslora=True, lora_alpha=6, rank_pattern={"v_proj": 2}
    )
    done = export_adapter(directory, base, tmp_path / "a.gguf")
    assert done.alpha == pytest.approx(6 * math.sqrt(4))
    arrays = reader_tensors(done.path)
    layers = dict(lora_layers(adapted))
    _, down_B = layers["model.layers.1.mlp.down_proj"].adapter_parameters("default")
    np.testing.assert_array_equal(
        arrays["blk.1.ffn_down.weight.lora_b"], down_B.detach().double().numpy()
    )
    _, v_B = layers["model.layers.1.self_attn.v_proj"].adapter_parameters("default")
    folded = v_B.detach().double().numpy() * (6 / math.sqrt(2)) * 2 / done.alpha
    np.testing.assert_allclose(arrays["blk.1.attn_v.weight.lora_b"], folded, rtol=1e-6)


def test_token_embedding_lora_is_written_in_llama_cpp_layout(tmp_path) -> None:
    """llama.cpp gathers rows of token_embd's lora_a (numpy (vocab, r)) and multiplies by
    lora_b (dim, r): ``(alpha / r) B A[:, id]`` per token."""
    base = tiny_models.llama()
    adapted, directory = saved_adapter(tmp_path / "adapter", base, target_modules=["embed_tokens"])
    done = export_adapter(directory, base, tmp_path / "a.gguf")
    arrays = reader_tensors(done.path)
    lora_a, lora_b = arrays["token_embd.weight.lora_a"], arrays["token_embd.weight.lora_b"]
    assert lora_a.shape == (128, 4) and lora_b.shape == (64, 4)
    ids = tiny_models.input_ids(batch=1, length=10)[0]
    layer = dict(lora_layers(adapted))["model.embed_tokens"]
    with torch.no_grad():
        effect = (layer(ids) - layer.base_layer(ids)).double().numpy()
    reference = (done.alpha / lora_b.shape[1]) * lora_a[ids.numpy()] @ lora_b.T
    np.testing.assert_allclose(effect, reference, rtol=1e-5, atol=1e-7)


def test_modules_to_save_is_refused_or_dropped_with_its_name(tmp_path) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base, modules_to_save=["lm_head"])
    output = tmp_path / "a.gguf"
    with pytest.raises(
        UserError, match=r"lm_head\.weight: a full trained copy .*--drop-unsupported"
    ):
        export_adapter(directory, base, output)
    assert not output.exists()
    done = export_adapter(directory, base, output, drop_unsupported=True)
    assert len(done.dropped) == 1 and done.dropped[0].startswith("base_model.model.lm_head.weight")
    assert len(done.modules) == 8
    assert not any(name.startswith("output") for name in reader_tensors(output))


def test_trained_biases_are_refused(tmp_path) -> None:
    base = qwen2()  # q/k/v have biases
    _, directory = saved_adapter(tmp_path / "adapter", base, bias="lora_only")
    with pytest.raises(UserError, match=r"q_proj\.base_layer\.bias: a trained bias"):
        export_adapter(directory, base, tmp_path / "a.gguf")


def test_dora_is_refused_even_with_drop_unsupported(tmp_path) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    config_path = directory / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"use_dora": True}))
    with pytest.raises(UserError, match=r"DoRA.*no magnitude vectors"):
        export_adapter(directory, base, tmp_path / "a.gguf", drop_unsupported=True)


def test_lora_on_tied_embeddings_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    tied = type(tiny_models.llama())(tiny_models.llama_config(tie_word_embeddings=True)).eval()
    _, directory = saved_adapter(tmp_path / "head", tied, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserError, match=r"lm_head .*tied to the token embedding"):
        export_adapter(directory, tied, tmp_path / "a.gguf")
    _, directory = saved_adapter(tmp_path / "embed", tied, target_modules=["embed_tokens"])
    with pytest.raises(UserError, match=r"embed_tokens .*llama\.cpp aborts"):
        export_adapter(directory, tied, tmp_path / "b.gguf")


def test_unmapped_architecture_wrong_base_and_quantized_type_are_refused(tmp_path) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    with pytest.raises(UserError, match=r"made for a LlamaForCausalLM .* GPT2LMHeadModel given"):
        export_adapter(directory, tiny_models.gpt2(), tmp_path / "a.gguf")
    gpt2 = tiny_models.gpt2()  # an adapter of GPT-2 itself: an architecture no GGUF map names
    _, gpt2_adapter = saved_adapter(tmp_path / "gpt2", gpt2, target_modules=["c_attn"])
    with pytest.raises(UserError, match="model_type='gpt2'"):
        export_adapter(gpt2_adapter, gpt2, tmp_path / "a.gguf")
    torch.manual_seed(0)
    wider = type(base)(tiny_models.llama_config(hidden_size=128)).eval()
    with pytest.raises(
        UserError, match=r"do not fit the weight \[.*\] of the LlamaForCausalLM given"
    ):
        export_adapter(directory, wider, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="--type q8_0 for an adapter"):
        export_adapter(directory, base, tmp_path / "a.gguf", tensor_type="q8_0")
    assert not (tmp_path / "a.gguf").exists()


def test_lorakit_merge_agrees_with_the_file(tmp_path) -> None:
    """The adapter effect through the file equals the merged model's weight change (lorakit's
    merge is exact), for one rsLoRA q_proj with its rows mapped back."""
    base = tiny_models.llama()
    adapted, directory = saved_adapter(tmp_path / "adapter", base, use_rslora=True)
    done = export_adapter(directory, base, tmp_path / "a.gguf")
    arrays = reader_tensors(done.path)
    merged = lorakit.merge_and_unload(adapted)
    name = "model.layers.1.self_attn.q_proj"
    change = (merged.get_submodule(name).weight - base.get_submodule(name).weight).double()
    identity = np.eye(64)
    reference = llama_cpp_effect(
        arrays, done.alpha, done.modules[name], identity, base.config, True
    )
    np.testing.assert_allclose(change.detach().numpy(), reference.T, atol=2e-6)


def test_fold_scale_keeps_the_update() -> None:
    """``functional.fold_scale``: ``s_t B' A == s B A`` for the reader's own scale ``s_t``."""
    from lorakit.functional import delta_weight, fold_scale

    lora_A, lora_B = torch.randn(4, 10), torch.randn(6, 4)
    rslora_scale, llama_cpp_scale = 6 / math.sqrt(4), 6 / 4  # alpha 6, r 4
    folded = fold_scale(lora_B, rslora_scale, llama_cpp_scale)
    torch.testing.assert_close(
        delta_weight(lora_A, folded, llama_cpp_scale), delta_weight(lora_A, lora_B, rslora_scale)
    )
    assert not torch.allclose(folded, lora_B)


def test_cli_drops_what_it_says_with_drop_unsupported(tmp_path, model_dir, capsys) -> None:
    from lorakit.cli import main
    from lorakit.models import load_model

    base, _ = load_model(model_dir, progress=False)
    _, adapter = saved_adapter(tmp_path / "adapter", base, modules_to_save=["lm_head"])
    args = ["export", str(adapter), "--model", str(model_dir), "--format", "gguf"]
    assert main([*args, "--output", str(tmp_path / "a.gguf")]) == 2
    assert "modules_to_save" in capsys.readouterr().err
    assert main([*args, "--drop-unsupported", "--output", str(tmp_path / "a.gguf")]) == 0
    out = capsys.readouterr().out
    assert "lorakit: dropped base_model.model.lm_head.weight: a full trained copy" in out
    assert "8 modules" in out and (tmp_path / "a.gguf").is_file()


def test_cli_exports_an_adapter_kept_in_a_default_subdirectory(tmp_path, model_dir) -> None:
    """PEFT's layout (DIR/default/adapter_config.json), which every reader takes: export used
    to take DIR for a model spec."""
    import shutil

    from lorakit.cli import main
    from lorakit.models import load_model

    base, _ = load_model(model_dir, progress=False)
    _, adapter = saved_adapter(tmp_path / "flat", base)
    shutil.copytree(adapter, tmp_path / "nested" / "default")
    for source, name in ((adapter, "flat.gguf"), (tmp_path / "nested", "nested.gguf")):
        args = ["export", str(source), "--model", str(model_dir), "--format", "gguf"]
        assert main([*args, "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "flat.gguf").read_bytes() == (tmp_path / "nested.gguf").read_bytes()


def test_a_file_missing_one_factor_of_a_module_is_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from lorakit.errors import AdapterFileError

    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = next(key for key in sorted(tensors) if "v_proj.lora_B" in key)
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"v_proj has no lora_B.*re-save"):
        export_adapter(directory, base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_an_adapter_for_a_base_llama_cpp_cannot_load_is_refused(tmp_path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.gguf_helpers import SIZES

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(**SIZES, head_dim=32)).eval()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    with pytest.raises(UserError, match=r"qwen2.*head_dim=32.*hidden_size=64"):
        export_adapter(directory, base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
