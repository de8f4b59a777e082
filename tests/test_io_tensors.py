"""``read_safetensors``: one read, tensors equal to safetensors' own loader, bulk finite check."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import AdapterFileError
from lorakit.io.tensors import read_safetensors


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(5, 7, generator=generator),
        "b.bf16": torch.randn(3, 4, generator=generator).bfloat16(),
        "c.f16": torch.randn(6, generator=generator).half(),
        "d.f64": torch.randn(2, 2, generator=generator).double(),
        "e.i64": torch.arange(9).reshape(3, 3),
        "f.bool": torch.tensor([True, False, True]),
        "g.f8": torch.randn(4, generator=generator).to(torch.float8_e4m3fn),
        "h.scalar": torch.tensor(3.5),
        "i.empty": torch.zeros(0, 4),
    }


def _hand_written(path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file with tensors in exactly the given order (safetensors' writer sorts)."""
    header, data = {}, b""
    for key, dtype, shape, raw in entries:
        header[key] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the data starts 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_same_tensors_as_safetensors_each_with_its_own_storage(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_mixed_tensors(), path, metadata={"note": "x"})
    expected = load_file(path)
    contents = read_safetensors(path)
    assert contents.header.metadata == {"note": "x"} and contents.nonfinite == frozenset()
    assert sorted(contents.tensors) == sorted(expected)
    pointers = set()
    for key, tensor in contents.tensors.items():
        assert tensor.dtype == expected[key].dtype and tensor.shape == expected[key].shape, key
        raw, want = tensor.reshape(-1), expected[key].reshape(-1)
        assert torch.equal(raw.view(torch.uint8), want.view(torch.uint8)), key  # same bits
        storage = tensor.untyped_storage()
        assert storage.nbytes() == tensor.numel() * tensor.element_size(), key
        if tensor.numel():
            pointers.add(storage.data_ptr())
    assert len(pointers) == len([t for t in expected.values() if t.numel()])


@pytest.mark.parametrize(
    ("key", "bad"),
    [("a.f32", float("nan")), ("b.bf16", float("inf")), ("c.f16", -float("inf"))],
)
def test_non_finite_tensors_are_named(tmp_path, key, bad) -> None:
    tensors = _mixed_tensors()
    tensors[key].view(-1)[1] = bad
    save_file(tensors, tmp_path / "t.safetensors")
    assert read_safetensors(tmp_path / "t.safetensors").nonfinite == {key}


def test_an_overflowing_sum_of_finite_values_is_not_called_non_finite(tmp_path) -> None:
    save_file({"big": torch.full((4,), 3e38), "small": torch.ones(3)}, tmp_path / "t.safetensors")
    assert read_safetensors(tmp_path / "t.safetensors").nonfinite == frozenset()


def test_int_bytes_read_as_nan_inside_a_float_span_are_not_called_non_finite(tmp_path) -> None:
    """An int tensor whose bytes read as float NaN sits between two float tensors: the bulk sum
    over their span is NaN, and the exact check clears every float tensor."""
    first, second = torch.randn(3), torch.randn(2, 2)
    nan_pattern = torch.full((2,), 0x7FC00000, dtype=torch.int32)
    path = tmp_path / "t.safetensors"
    _hand_written(
        path,
        [
            ("first", "F32", [3], first.numpy().tobytes()),
            ("ints", "I32", [2], nan_pattern.numpy().tobytes()),
            ("second", "F32", [2, 2], second.numpy().tobytes()),
        ],
    )
    contents = read_safetensors(path)
    assert contents.nonfinite == frozenset()
    assert torch.equal(contents.tensors["first"], first)
    assert torch.equal(contents.tensors["second"], second)
    assert torch.equal(contents.tensors["ints"], nan_pattern)


def test_misaligned_tensor_is_read_right_and_checked(tmp_path) -> None:
    values = torch.tensor([[1.5, float("inf")], [-2.0, 0.25]])
    path = tmp_path / "t.safetensors"
    _hand_written(
        path,
        [
            ("byte", "U8", [1], b"\x07"),
            ("floats", "F32", [2, 2], values.numpy().tobytes()),
        ],
    )
    contents = read_safetensors(path)
    assert torch.equal(contents.tensors["floats"], values)
    assert contents.tensors["byte"].tolist() == [7] and contents.nonfinite == {"floats"}


def test_truncated_file_is_refused(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_mixed_tensors(), path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        read_safetensors(path)
