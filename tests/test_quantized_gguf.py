"""GGUF blocks: lorakit's torch dequantizer against the ``gguf`` package's numpy reference (bit for
bit), ``GGUFLinear`` (memory = the packed bytes, the float weight never saved for backward),
reading a Llama's linears from a GGUF file, and clear errors for unsupported block types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from lorakit import quantized
from lorakit.errors import UserError
from lorakit.quantized import UnsupportedQuantizedLayerError
from lorakit.quantized.gguf_blocks import BLOCK_FORMATS, GGUFLinear, dequantize_blocks
from lorakit.quantized.gguf_file import gguf_linear, replace_llama_linears
from tests import tiny_models

BLOCK_TYPES = sorted(BLOCK_FORMATS)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def _random_rows(seed: int, rows: int = 16, columns: int = 160) -> np.ndarray:
    """Rows with scales from 1e-4 to 1e3, a zero row and a constant row (edge blocks)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, columns)) * 10.0 ** rng.uniform(-4, 3, (rows, 1))
    values[0] = 0.0
    values[1] = -2.5
    return values.astype(np.float32)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequantize_blocks_equals_the_gguf_reference_bit_for_bit(block_type, seed):
    quant_type = GGMLQuantizationType[block_type]
    packed = quants.quantize(_random_rows(seed), quant_type)
    reference = quants.dequantize(packed, quant_type)
    ours = dequantize_blocks(torch.from_numpy(packed), block_type).numpy()
    assert ours.shape == reference.shape == (16, 160)
    assert np.array_equal(_bits(ours), _bits(reference))


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_random_bytes_dequantize_like_the_reference(block_type):
    """Any byte pattern (not only what a quantizer writes), except NaN/inf scales."""
    fmt = BLOCK_FORMATS[block_type]
    rng = np.random.default_rng(7)
    packed = rng.integers(0, 256, (8, 5 * fmt.block_bytes), dtype=np.uint8)
    blocks = packed.reshape(8, 5, fmt.block_bytes)
    blocks[..., 1] &= 0x3B  # float16 exponent below 0x1E: finite scales (and minimums)
    blocks[..., 3] &= 0x3B
    reference = quants.dequantize(packed, GGMLQuantizationType[block_type])
    ours = dequantize_blocks(torch.from_numpy(packed), block_type).numpy()
    assert np.array_equal(_bits(ours), _bits(reference))


def _layer(block_type: str = "Q4_1", bias: bool = True) -> tuple[GGUFLinear, torch.Tensor]:
    weight = torch.randn(40, 96)
    packed = quants.quantize(weight.numpy(), GGMLQuantizationType[block_type])
    layer = GGUFLinear(torch.from_numpy(packed), block_type, 96, torch.randn(40) if bias else None)
    return layer, weight


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_gguf_linear_memory_is_the_packed_bytes(block_type):
    layer, _ = _layer(block_type, bias=False)
    assert list(layer.parameters()) == []
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored == 40 * (96 // 32) * BLOCK_FORMATS[block_type].block_bytes


def test_gguf_linear_forward_backward_and_no_float_weight_saved_for_backward():
    layer, _ = _layer("Q4_1")
    weight = dequantize_blocks(layer.packed, "Q4_1")
    x = torch.randn(3, 7, 96, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    assert torch.equal(out, F.linear(x, weight, layer.bias))
    assert (tuple(weight.shape), torch.float32) not in saved
    assert saved == [(tuple(layer.packed.shape), torch.uint8)]
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    torch.testing.assert_close(x.grad, grad_output @ weight, rtol=0, atol=1e-5)


def test_gguf_linear_runs_in_bfloat16():
    layer, _ = _layer("Q8_0")
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(
        x, dequantize_blocks(layer.packed, "Q8_0").bfloat16(), layer.bias.bfloat16()
    )
    torch.testing.assert_close(out, expected)


def test_unsupported_block_type_names_the_type_and_the_tensor():
    with pytest.raises(UnsupportedQuantizedLayerError, match=r"'blk\.0\.ffn_up\.weight'.*Q6_K"):
        GGUFLinear(
            torch.zeros(4, 210, dtype=torch.uint8), "Q6_K", 256, tensor_name="'blk.0.ffn_up.weight'"
        )


def test_packed_bytes_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"\(out, 60\)"):
        GGUFLinear(torch.zeros(4, 61, dtype=torch.uint8), "Q4_1", 96)


# ----------------------------------------------------------------- a GGUF file
def _llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion of q/k rows: reshape(heads, 2, rows/heads/2, in).swapaxes(1, 2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {
    "self_attn.q_proj": ("attn_q", "Q4_0"),
    "self_attn.k_proj": ("attn_k", "Q4_1"),
    "self_attn.v_proj": ("attn_v", "Q8_0"),
    "self_attn.o_proj": ("attn_output", "Q4_1"),
    "mlp.gate_proj": ("ffn_gate", "Q4_1"),
    "mlp.up_proj": ("ffn_up", "Q8_0"),
    "mlp.down_proj": ("ffn_down", "Q4_0"),
}


def _write_tiny_gguf(
    path,
    model,
    unsupported: str | None = None,
    *,
    head_count_kv: bool = True,
    missing: tuple[str, ...] = (),
) -> None:
    """The tiny Llama's block linears as a GGUF file, laid out as llama.cpp writes them
    (without ``llama.attention.head_count_kv`` if asked, and without the ``missing`` tensors)."""
    config = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    if head_count_kv:
        writer.add_head_count_kv(config.num_key_value_heads)
    for index, layer in enumerate(model.model.layers):
        for module_name, (kind, block_type) in GGUF_NAMES.items():
            if f"blk.{index}.{kind}.weight" in missing:
                continue
            weight = layer.get_submodule(module_name).weight.detach().numpy()
            if kind in ("attn_q", "attn_k"):
                heads = (
                    config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
                )
                weight = _llama_cpp_rows(weight, heads)
            name = f"blk.{index}.{kind}.weight"
            if name == unsupported:
                writer.add_tensor(
                    name, weight.astype(np.float16), raw_dtype=GGMLQuantizationType.F16
                )
                continue
            quant_type = GGMLQuantizationType[block_type]
            writer.add_tensor(name, quants.quantize(weight, quant_type), raw_dtype=quant_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_replace_llama_linears_reads_every_block_linear_in_transformers_row_order(tmp_path):
    model = tiny_models.llama()
    originals = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if hasattr(module, "weight") and name.split(".")[-1].endswith("proj")
    }
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model)
    replaced = replace_llama_linears(model, path)
    assert sorted(replaced) == sorted(originals)
    for name, weight in originals.items():
        module = model.get_submodule(name)
        block_type = GGUF_NAMES[name.split(".", 3)[3]][1]
        assert quantized.describe(module) == f"gguf-{block_type}"
        # quantizing is row-local, so reading the file must give exactly the blocks of the
        # transformers-ordered weight (a wrong q/k row order would not)
        expected = quants.quantize(weight.numpy(), GGMLQuantizationType[block_type])
        assert np.array_equal(module.packed.numpy(), expected), name
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_a_file_with_an_unsupported_block_type_names_it_and_changes_nothing(tmp_path):
    model = tiny_models.llama()
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model, unsupported="blk.1.ffn_up.weight")
    with pytest.raises(UnsupportedQuantizedLayerError, match=r"'blk\.1\.ffn_up\.weight'.*F16"):
        replace_llama_linears(model, path)
    assert not any(isinstance(module, GGUFLinear) for module in model.modules())


def test_reading_only_some_kinds_of_linears(tmp_path):
    model = tiny_models.llama()
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model)
    replaced = replace_llama_linears(model, path, only=["attn_v"])
    assert sorted(replaced) == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert not isinstance(model.model.layers[0].self_attn.q_proj, GGUFLinear)


def _float_projections(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith("_proj")}


@pytest.mark.parametrize(
    ("file_config", "field", "file_value", "model_field", "model_value"),
    [
        ({"num_hidden_layers": 1}, "llama.block_count", 1, "num_hidden_layers", 2),
        ({"num_hidden_layers": 3}, "llama.block_count", 3, "num_hidden_layers", 2),
        (
            {"num_attention_heads": 2, "num_key_value_heads": 1},
            "llama.attention.head_count",
            2,
            "num_attention_heads",
            4,
        ),
        ({"num_key_value_heads": 4}, "llama.attention.head_count_kv", 4, "num_key_value_heads", 2),
    ],
)
def test_a_file_made_for_another_model_is_refused_naming_the_field_and_changes_nothing(
    tmp_path, file_config, field, file_value, model_field, model_value
):
    """Same tensor shapes or not: fewer blocks would leave layers float unreported, other head
    counts would reorder q/k rows by the wrong heads (silently wrong weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(tiny_models.llama_config(**file_config))
    path = tmp_path / "other.gguf"
    _write_tiny_gguf(path, other)
    model = tiny_models.llama()
    assert getattr(model.config, model_field) == model_value
    before = _float_projections(model)
    with pytest.raises(UserError) as refused:
        replace_llama_linears(model, path)
    message = str(refused.value)
    assert str(path) in message and field in message and model_field in message
    assert f"{field} = {file_value}" in message and f"{model_field} = {model_value}" in message
    assert _float_projections(model) == before  # the very same float modules
    assert not any(isinstance(module, GGUFLinear) for module in model.modules())


def test_head_count_kv_defaults_to_head_count_as_in_llama_cpp(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_models.llama_config(num_key_value_heads=4))  # no GQA
    key = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    path = tmp_path / "mha.gguf"
    _write_tiny_gguf(path, model, head_count_kv=False)
    assert "llama.attention.head_count_kv" not in GGUFReader(path).fields
    assert len(replace_llama_linears(model, path)) == 14
    expected = quants.quantize(key.numpy(), GGMLQuantizationType.Q4_1)  # transformers' rows
    assert np.array_equal(model.model.layers[1].self_attn.k_proj.packed.numpy(), expected)
    gqa = tiny_models.llama()  # 4 heads, 2 kv heads: the file's default (4) does not fit it
    with pytest.raises(UserError, match=r"head_count_kv = 4 \(none given.*= 2"):
        replace_llama_linears(gqa, path)
    assert not any(isinstance(module, GGUFLinear) for module in gqa.modules())


def test_a_block_without_a_requested_linear_is_refused_and_changes_nothing(tmp_path):
    model = tiny_models.llama()
    path = tmp_path / "partial.gguf"
    _write_tiny_gguf(path, model, missing=("blk.1.ffn_down.weight",))
    with pytest.raises(UserError, match=r"'blk\.1\.ffn_down\.weight'"):
        replace_llama_linears(model, path)
    assert not any(isinstance(module, GGUFLinear) for module in model.modules())
    replaced = replace_llama_linears(model, path, only=["attn_q", "ffn_up"])  # not asked: fine
    assert len(replaced) == 4


def test_unknown_kinds_in_only_are_refused(tmp_path):
    model = tiny_models.llama()
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model)
    with pytest.raises(UserError, match=r"'q_proj'.*attn_q"):
        replace_llama_linears(model, path, only=["attn_v", "q_proj"])
    assert not any(isinstance(module, GGUFLinear) for module in model.modules())


# ----------------------------------------------------------------- the packaged SmolLM2 file
def _smollm2_gguf():
    from lorakit.model_specs import BUILTIN_MODELS, _package_folder

    builtin = BUILTIN_MODELS["smollm2-135m-instruct"]
    return _package_folder(builtin) / builtin.relative_path


@pytest.mark.integration
def test_real_smollm2_tensors_dequantize_like_the_reference():
    reader = GGUFReader(_smollm2_gguf())
    checked = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in BLOCK_FORMATS or tensor.name.split(".")[-2] in checked:
            continue
        checked.add(tensor.name.split(".")[-2])  # one tensor of each kind (q, k, ..., embedding)
        ours = gguf_linear(tensor).packed
        reference = quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(_bits(dequantize_blocks(ours, kind).numpy()), _bits(reference))
    assert {"token_embd", "attn_q", "attn_k", "ffn_down"} <= checked


@pytest.mark.integration
def test_real_smollm2_gguf_linears_equal_the_converted_float_model_bit_for_bit():
    """The cached float model is transformers' own reading of the same file: every GGUFLinear
    dequantizes to exactly its weight (q/k rows included), and the logits agree."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import resolve_model

    directory = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    floats = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.endswith("_proj")
    }
    ids = torch.tensor([[1, 504, 3437, 314, 253, 2]])
    with torch.no_grad():
        float_logits = model(ids).logits
    replaced = replace_llama_linears(model, _smollm2_gguf())
    assert len(replaced) == 210
    for name in replaced:
        assert torch.equal(quantized.dequantized_weight(model.get_submodule(name)), floats[name]), (
            name
        )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, float_logits, rtol=1e-4, atol=1e-4)
