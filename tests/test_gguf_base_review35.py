"""Malformed GGUF base files are one ``UserError`` naming the file, never a raw exception, and
change nothing of the model: a q/k tensor of another shape (checked before its rows are put in
transformers' order), rows that are no whole rotary pairs, and header values of the wrong type
or not UTF-8. Per-layer head counts (llama.cpp's ``get_key_or_arr``) are read when all equal."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from lorakit.errors import UserError
from lorakit.quantized.gguf_blocks import GGUFLinear
from lorakit.quantized.gguf_file import LLAMA_LINEARS, replace_llama_linears
from tests import tiny_models

Q8_0 = GGMLQuantizationType.Q8_0


def _llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of transformers' reordering on load)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _writer(path, blocks=2, heads=4, heads_kv=2) -> GGUFWriter:
    """A writer with the Llama header; a count of None is left out, a callable adds the key."""
    writer = GGUFWriter(str(path), "llama")
    for key, value in (
        ("llama.block_count", blocks),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", heads_kv),
    ):
        if callable(value):
            value(writer, key)
        elif value is not None:
            writer.add_uint32(key, value)
    return writer


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write(path, model, replaced=None, kinds=tuple(LLAMA_LINEARS), **header) -> None:
    """``model``'s block linears as Q8_0 in llama.cpp's layout; ``replaced``: tensor name ->
    float rows written instead (as they are)."""
    config = model.config
    writer = _writer(path, **header)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for index, layer in enumerate(model.model.layers):
        for kind in kinds:
            name = f"blk.{index}.{kind}.weight"
            weight = layer.get_submodule(LLAMA_LINEARS[kind]).weight.detach().numpy()
            if kind in heads:
                weight = _llama_cpp_rows(weight, heads[kind])
            weight = (replaced or {}).get(name, weight)
            writer.add_tensor(name, quants.quantize(weight, Q8_0), raw_dtype=Q8_0)
    _finish(writer)


def _snapshot(model) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    return {
        name: (module, module.weight.detach().clone())
        for name, module in model.named_modules()
        if name.endswith("_proj")
    }


def _assert_unchanged(model, before) -> None:
    assert not any(isinstance(module, GGUFLinear) for module in model.modules())
    for name, (module, weight) in before.items():
        assert model.get_submodule(name) is module and torch.equal(module.weight, weight), name


def _refusal(model, path, **options) -> str:
    before = _snapshot(model)
    with pytest.raises(UserError) as refused:
        replace_llama_linears(model, path, **options)
    _assert_unchanged(model, before)
    message = str(refused.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("tensor", "module", "shape"),
    [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", (64, 64)),
        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj", (32, 64)),
    ],
)
def test_a_q_or_k_tensor_of_another_row_count_is_refused_by_its_shape(
    tmp_path, tensor, module, shape
):
    """36 rows: no multiple of 2 x heads, so reordering them first raised torch's RuntimeError;
    blk.1.attn_k comes after tensors already read: none of them is put in either."""
    model = tiny_models.llama()
    rows = np.random.default_rng(0).standard_normal((36, 64)).astype(np.float32)
    path = tmp_path / "rows36.gguf"
    _write(path, model, replaced={tensor: rows})
    assert _refusal(model, path) == (
        f"GGUF tensor {tensor!r} is (36, 64) but {module!r} is {shape}; build the model "
        "from this GGUF file's config"
    )


def test_rows_that_are_no_whole_rotary_pairs_are_refused_naming_the_tensor(tmp_path):
    """q_proj (60, 64) fits the file's tensor, but 60 rows are no 4 heads of rotary pairs
    (llama.cpp's row order cannot be undone). transformers refuses an odd head_dim in the config,
    so the model's q_proj layers are swapped for (60, 64) ones."""
    model = tiny_models.llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj = torch.nn.Linear(64, 60, bias=False)
    path = tmp_path / "odd_head_dim.gguf"
    writer = _writer(path)
    for index in range(2):
        weight = model.model.layers[index].self_attn.q_proj.weight.detach().numpy()
        writer.add_tensor(
            f"blk.{index}.attn_q.weight", quants.quantize(weight, Q8_0), raw_dtype=Q8_0
        )
    _finish(writer)
    message = _refusal(model, path, only=["attn_q"])
    assert message.startswith(f"GGUF tensor 'blk.0.attn_q.weight' of '{path}' has 60 rows")
    assert "not a multiple of 2 x its 4 heads" in message and "head_dim" in message


def test_an_architecture_that_is_not_utf8_is_refused_naming_the_key(tmp_path):
    model = tiny_models.llama()
    path = tmp_path / "tiny.gguf"
    _write(path, model)
    data = bytearray(path.read_bytes())
    at = data.index(b"general.architecture") + len(b"general.architecture") + 4 + 8
    assert data[at : at + 5] == b"llama"
    data[at + 3] = 0xDC  # one corrupted byte: no UTF-8 continuation byte follows
    path.write_bytes(bytes(data))
    assert _refusal(model, path) == (
        f"GGUF file '{path}': its general.architecture is not UTF-8 text (invalid continuation "
        "byte at byte 3 of b'lla\\xdca'); the file is corrupt or not a Llama-family GGUF file "
        "lorakit reads: use a GGUF file written by llama.cpp's convert_hf_to_gguf.py"
    )


def _string(writer, key):
    writer.add_string(key, "two")


def _array(*values):
    return lambda writer, key: writer.add_array(key, list(values))


@pytest.mark.parametrize(
    ("header", "key", "problem"),
    [
        ({"blocks": _string}, "llama.block_count", "has type STRING, not an integer"),
        ({"blocks": _array(2)}, "llama.block_count", "has type ARRAY of INT32, not an integer"),
        (
            {"heads": lambda writer, key: writer.add_float32(key, 4.0)},
            "llama.attention.head_count",
            "has type FLOAT32, not an integer or an array of integers",
        ),
        (
            {"heads": lambda writer, key: writer.add_bool(key, True)},
            "llama.attention.head_count",
            "has type BOOL, not an integer or an array of integers",
        ),
        (
            {"heads_kv": _array("2", "2")},
            "llama.attention.head_count_kv",
            "has type ARRAY of STRING, not an integer or an array of integers",
        ),
        (
            {"heads": _array(4, 4, 4)},
            "llama.attention.head_count",
            "has 3 entries, not one per block (llama.block_count = 2)",
        ),
        (
            {"architecture": 5},
            "general.architecture",
            "has type UINT32, not STRING",
        ),
    ],
)
def test_a_header_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path, header, key, problem):
    architecture = header.pop("architecture", None)
    path = tmp_path / "bad_header.gguf"
    writer = _writer(path, **header)
    if architecture is not None:
        writer.add_uint32("general.architecture", architecture)
    _finish(writer)
    assert _refusal(tiny_models.llama(), path) == (
        f"GGUF file '{path}': its {key} {problem}; the file is corrupt or not a Llama-family "
        "GGUF file lorakit reads: use a GGUF file written by llama.cpp's convert_hf_to_gguf.py"
    )


def test_an_empty_head_count_array_is_refused_naming_the_key(tmp_path):
    """gguf's writer refuses empty arrays: a one-entry array's count is set to 0 in the bytes."""
    path = tmp_path / "empty_array.gguf"
    _finish(_writer(path, heads=_array(4)))
    key = b"llama.attention.head_count"
    one_entry = key + struct.pack("<IIQi", 9, 5, 1, 4)  # ARRAY of INT32, 1 entry: 4
    data = path.read_bytes()
    assert data.count(one_entry) == 1
    path.write_bytes(data.replace(one_entry, key + struct.pack("<IIQ", 9, 5, 0)))
    assert _refusal(tiny_models.llama(), path) == (
        f"GGUF file '{path}': its llama.attention.head_count has type empty ARRAY, not an "
        "integer or an array of integers; the file is corrupt or not a Llama-family GGUF file "
        "lorakit reads: use a GGUF file written by llama.cpp's convert_hf_to_gguf.py"
    )


def test_equal_per_layer_head_counts_are_read_as_that_count(tmp_path):
    """llama.cpp reads head counts as one integer or one per block: the same blocks either way."""
    model = tiny_models.llama()
    plain, per_layer = tmp_path / "plain.gguf", tmp_path / "per_layer.gguf"
    _write(plain, model)
    _write(per_layer, model, heads=_array(4, 4), heads_kv=_array(2, 2))
    expected = tiny_models.llama()
    names = replace_llama_linears(expected, plain)
    assert replace_llama_linears(model, per_layer) == names and len(names) == 14
    for name in names:
        assert torch.equal(model.get_submodule(name).packed, expected.get_submodule(name).packed)


def test_per_layer_head_counts_that_differ_are_refused_naming_the_key(tmp_path):
    model = tiny_models.llama()
    path = tmp_path / "uneven.gguf"
    _write(path, model, heads_kv=_array(2, 1))
    assert _refusal(model, path) == (
        f"GGUF file '{path}': its llama.attention.head_count_kv differs between layers ([2, 1]); "
        "lorakit reads only models with the same count in every layer (one transformers config "
        "for all): use another GGUF file"
    )
