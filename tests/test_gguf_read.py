"""GGUF LoRA files read back: ``load_adapter(model, "x.gguf")`` (the inverse of the export,
q/k rows put back) and ``lorakit inspect x.gguf``."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import AdapterFileError
from lorakit.export.gguf_adapter import export_adapter
from lorakit.state import lora_layers, state_of
from tests import tiny_models
from tests.gguf_helpers import BUILDERS, qwen2, saved_adapter, transformers_row_order

PATTERNS = {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}


def loaded(base_builder, path, **options):
    model = base_builder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a GGUF file carries no base-model fingerprint
        return lorakit.load_adapter(model, path, **options)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_models.input_ids()).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_round_trip_gives_identical_outputs(tmp_path, arch) -> None:
    base = BUILDERS[arch]()
    adapted, directory = saved_adapter(tmp_path / "adapter", base)
    export_adapter(directory, base, tmp_path / "a.gguf")
    model = loaded(BUILDERS[arch], tmp_path / "a.gguf")
    assert torch.equal(logits(model), logits(adapted))
    assert not torch.equal(logits(model), logits(base))
    originals = dict(lora_layers(adapted))
    for name, layer in lora_layers(model):  # the factors themselves, q/k rows back in place
        for got, want in zip(
            layer.adapter_parameters("default"),
            originals[name].adapter_parameters("default"),
            strict=True,
        ):
            assert torch.equal(got, want), name


def test_round_trip_of_rslora_with_patterns_is_exact_to_rounding(tmp_path) -> None:
    base = tiny_models.llama()
    adapted, directory = saved_adapter(tmp_path / "adapter", base, **PATTERNS)
    export_adapter(directory, base, tmp_path / "a.gguf")
    model = loaded(tiny_models.llama, tmp_path / "a.gguf")
    config = lorakit.adapter_configs(model)["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8 * 2, False)  # alpha/r rule
    assert set(config.rank_pattern.values()) == {2} and len(config.rank_pattern) == 2
    torch.testing.assert_close(logits(model), logits(adapted), rtol=1e-5, atol=1e-5)


def test_token_embedding_round_trip(tmp_path) -> None:
    base = tiny_models.llama()
    adapted, directory = saved_adapter(
        tmp_path / "adapter", base, target_modules=["embed_tokens", "q_proj"]
    )
    export_adapter(directory, base, tmp_path / "a.gguf")
    assert torch.equal(logits(loaded(tiny_models.llama, tmp_path / "a.gguf")), logits(adapted))


def write_llama_cpp_style_file(path, pairs, alpha: float | None, arch: str = "llama") -> None:
    """A GGUF LoRA as llama.cpp's converter writes one (``gguf.GGUFWriter`` directly); alpha
    None: no alpha key."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha is not None:
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, array in pairs.items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converter_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` as its converter applies it to lora_B."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def test_a_file_from_the_llama_cpp_world_loads_with_its_scale(tmp_path) -> None:
    """Written independently of lorakit's exporter: alpha 16, r = 8 on blk.1.attn_k (GQA: 2 KV
    heads), B in llama.cpp's row order. The loaded effect is (16 / 8) B A in transformers' rows."""
    generator = np.random.default_rng(0)
    lora_a, lora_b = generator.normal(size=(8, 64)), generator.normal(size=(32, 8))
    pairs = {
        "blk.1.attn_k.weight.lora_a": lora_a,
        "blk.1.attn_k.weight.lora_b": converter_permute(lora_b, 2),
    }
    write_llama_cpp_style_file(tmp_path / "x.gguf", pairs, alpha=16.0)
    model = loaded(tiny_models.llama, tmp_path / "x.gguf")
    layer = dict(lora_layers(model))["model.layers.1.self_attn.k_proj"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        effect = (layer(x) - layer.base_layer(x)).double().numpy()
    np.testing.assert_allclose(
        effect, x.double().numpy() @ (2.0 * lora_b @ lora_a).T, rtol=1e-5, atol=1e-5
    )
    assert lorakit.adapter_configs(model)["default"].r == 8


@pytest.mark.parametrize(("alpha", "scale"), [(0.0, 1.0), (None, 1.0), (-8.0, -1.0)])
def test_llama_cpps_alpha_rule_zero_or_absent_is_scale_one_and_a_sign_is_kept(
    tmp_path, alpha, scale
) -> None:
    """llama.cpp scales a pair by alpha / rank, and by 1 where alpha is 0 (or the key is
    absent, read as 0); a negative alpha is allowed there. Two ranks (8 and 4), so a single
    lora_alpha / r could not give scale 1 to both."""
    generator = np.random.default_rng(1)
    pairs = {
        "blk.0.attn_q.weight.lora_a": generator.normal(size=(8, 64)),
        "blk.0.attn_q.weight.lora_b": converter_permute(generator.normal(size=(64, 8)), 4),
        "blk.0.attn_v.weight.lora_a": generator.normal(size=(4, 64)),
        "blk.0.attn_v.weight.lora_b": generator.normal(size=(32, 4)),
        "blk.1.attn_v.weight.lora_a": generator.normal(size=(8, 64)),
        "blk.1.attn_v.weight.lora_b": generator.normal(size=(32, 8)),
    }
    write_llama_cpp_style_file(tmp_path / "x.gguf", pairs, alpha=alpha)
    model = loaded(tiny_models.llama, tmp_path / "x.gguf")
    layers = dict(lora_layers(model))
    x = torch.randn(3, 64)
    for block, rank in ((0, 4), (1, 8)):
        layer = layers[f"model.layers.{block}.self_attn.v_proj"]
        with torch.no_grad():
            effect = (layer(x) - layer.base_layer(x)).double().numpy()
        lora_a = pairs[f"blk.{block}.attn_v.weight.lora_a"]
        lora_b = pairs[f"blk.{block}.attn_v.weight.lora_b"]
        expected = scale * (8.0 / rank if alpha == -8.0 else 1.0)
        np.testing.assert_allclose(
            effect, x.double().numpy() @ (expected * lora_b @ lora_a).T, rtol=1e-5, atol=1e-5
        )


def test_transformers_inverse_undoes_the_converter_permutation() -> None:
    """The oracle the export tests use is the inverse of the converter's permutation."""
    rows = np.arange(32 * 3).reshape(32, 3)
    config = tiny_models.llama_config()
    assert np.array_equal(
        transformers_row_order(converter_permute(rows, 2), "blk.0.attn_k.weight", config), rows
    )


def test_files_that_do_not_fit_are_refused_and_leave_the_model_alone(tmp_path) -> None:
    a = np.zeros((4, 64))
    write_llama_cpp_style_file(tmp_path / "half.gguf", {"blk.0.attn_q.weight.lora_a": a}, 8.0)
    write_llama_cpp_style_file(
        tmp_path / "far.gguf",
        {"blk.7.attn_q.weight.lora_a": a, "blk.7.attn_q.weight.lora_b": np.zeros((64, 4))},
        8.0,
    )
    base = qwen2()
    _, directory = saved_adapter(tmp_path / "adapter", base)
    export_adapter(directory, base, tmp_path / "qwen.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    flat = {"blk.0.attn_q.weight.lora_a": np.zeros(64), "blk.0.attn_q.weight.lora_b": a.T}
    write_llama_cpp_style_file(tmp_path / "flat.gguf", flat, 8.0)
    cases = {
        "flat.gguf": "blk.0.attn_q.weight has lora_a ne=\\[64\\]",
        "half.gguf": "blk.0.attn_q.weight is missing one component",
        "far.gguf": "blk.7.attn_q.weight names no module",
        "qwen.gguf": "architecture 'qwen2'",
        "junk.gguf": "not a readable GGUF file",
    }
    for file_name, message in cases.items():
        model = tiny_models.llama()
        with pytest.raises(AdapterFileError, match=message):
            lorakit.load_adapter(model, tmp_path / file_name)
        assert state_of(model) is None


def test_inspect_describes_a_gguf_adapter(tmp_path, capsys) -> None:
    base = tiny_models.llama()
    _, directory = saved_adapter(tmp_path / "adapter", base, rank_pattern={"down_proj": 2})
    export_adapter(directory, base, tmp_path / "a.gguf")
    assert main(["inspect", str(tmp_path / "a.gguf")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"architecture:\s+llama\n", text)
    assert re.search(r"rank:\s+2 \(2 tensors\), 4 \(6 tensors\)\n", text)
    assert re.search(r"alpha:\s+8\n", text)
    assert main(["inspect", str(tmp_path / "a.gguf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ranks"] == {"2": 2, "4": 6}
    assert summary["scalings"] == {"2": 4.0, "4": 2.0}
    assert summary["parameters"] == 2 * 2 * (96 + 64) + 2 * 4 * (64 + 64) + 4 * 4 * (64 + 32)
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2


@pytest.mark.parametrize(
    ("alpha", "scalings"), [(0.0, [1.0, 1.0]), (None, [1.0, 1.0]), (-8.0, [-2.0, -1.0])]
)
def test_inspect_reports_the_scale_llama_cpp_and_load_apply(tmp_path, capsys, alpha, scalings):
    """alpha 0 or absent: llama.cpp (and ``load_adapter``) scale each pair by 1, not alpha/r = 0;
    a negative alpha keeps alpha/r. ``inspect`` must show those scales."""
    generator = np.random.default_rng(2)
    pairs = {
        "blk.0.attn_v.weight.lora_a": generator.normal(size=(4, 64)),
        "blk.0.attn_v.weight.lora_b": generator.normal(size=(32, 4)),
        "blk.1.attn_v.weight.lora_a": generator.normal(size=(8, 64)),
        "blk.1.attn_v.weight.lora_b": generator.normal(size=(32, 8)),
    }
    write_llama_cpp_style_file(tmp_path / "x.gguf", pairs, alpha=alpha)
    assert main(["inspect", str(tmp_path / "x.gguf"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scalings"] == {"4": scalings[0], "8": scalings[1]}
    model = loaded(tiny_models.llama, tmp_path / "x.gguf")
    layers = dict(lora_layers(model))
    applied = {  # the scale load_adapter gives each pair, B's sign included
        rank: layers[f"model.layers.{block}.self_attn.v_proj"].scalings["default"]
        * float(np.sign(alpha or 1.0))
        for block, rank in ((0, "4"), (1, "8"))
    }
    assert applied == summary["scalings"]
    assert main(["inspect", str(tmp_path / "x.gguf")]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"scaling:\s+{scalings[0]:g} \(r=4\), {scalings[1]:g} \(r=8\)\n", text)


def test_commands_taking_an_adapter_accept_a_gguf_file(tmp_path, model_dir, capsys) -> None:
    """``lorakit merge`` (like eval, generate, export) loads ``--adapter x.gguf``."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_model

    base, _ = load_model(model_dir, progress=False)
    adapted, directory = saved_adapter(tmp_path / "adapter", base)
    export_adapter(directory, base, tmp_path / "a.gguf")
    merged_dir = tmp_path / "merged"
    args = ["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "a.gguf")]
    assert main([*args, "--output", str(merged_dir)]) == 0
    assert "no base-model fingerprint" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(logits(merged), logits(adapted), rtol=1e-5, atol=1e-5)
