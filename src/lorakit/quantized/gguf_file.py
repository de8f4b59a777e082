"""Read GGUF tensors straight from a ``.gguf`` file into ``GGUFLinear`` modules, and put them into
a transformers Llama model in place of its ``nn.Linear`` layers (train on exactly the weights
llama.cpp deploys).

The container is parsed by the ``gguf`` package (``GGUFReader``, a read-only memory map); the
blocks are copied once into the module (the file may be deleted afterwards) and dequantized by
lorakit's own ``dequantize_blocks``. llama.cpp stores the rows of ``attn_q`` / ``attn_k``
interleaved for its rotary kernel; transformers undoes that when it loads a GGUF file
(``reshape(heads, dim/2, 2, in).swapaxes(1, 2)``). Blocks never cross rows, so the same
reordering is applied to the packed rows themselves: exact, nothing dequantized.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.errors import UserError, first_line
from lorakit.quantized.gguf_blocks import GGUFLinear, block_format
from lorakit.quantized.gguf_header import header_count, header_string

__all__ = [
    "LLAMA_LINEARS",
    "gguf_linear",
    "llama_module_name",
    "replace_llama_linears",
    "rotary_row_order",
]

# GGUF tensor (within blk.N) -> transformers module (within model.layers.N)
LLAMA_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def _reader(path: str | os.PathLike[str]):
    """The ``gguf`` package's reader of ``path``. A path that is not a readable GGUF file (none
    there, a directory, empty, another format, truncated or corrupt) is one ``UserError``
    naming the path, what is wrong with it, and what to pass instead."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("reading GGUF files needs the package 'gguf': pip install gguf") from None
    problem = _path_problem(path)
    if problem is None:
        try:
            return GGUFReader(path)
        except (OSError, ValueError, KeyError, IndexError) as error:
            problem = f"is truncated or corrupt (reading it failed: {first_line(error, 120)})"
    raise UserError(
        f"GGUF file '{path}' {problem}; pass the path of a complete .gguf file (download it "
        "again, or convert the model with llama.cpp's convert_hf_to_gguf.py)"
    )


def _path_problem(path: str | os.PathLike[str]) -> str | None:
    """What makes ``path`` no GGUF file, judged without parsing it (nothing there, a directory,
    empty, not starting with ``GGUF_MAGIC``), or None if it may be one."""
    if os.path.isdir(path):
        return "is a directory, not a file"
    if not os.path.isfile(path):
        return "does not exist"
    try:
        with open(path, "rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if not magic:
        return "is empty"
    if magic != GGUF_MAGIC:
        return f"is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})"
    return None


def rotary_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row indices ``p`` with ``W_transformers = W_gguf[p]`` for ``attn_q`` / ``attn_k``:
    ``arange(rows).reshape(heads, rows / heads / 2, 2).swapaxes(1, 2).reshape(-1)``."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


def gguf_linear(tensor, row_order: torch.Tensor | None = None) -> GGUFLinear:
    """A ``GGUFLinear`` holding a copy of one ``gguf`` reader tensor's blocks (rows reordered by
    ``row_order`` if given). Unsupported block types raise, naming the type and the tensor."""
    fmt = block_format(tensor.tensor_type.name, f"GGUF tensor {tensor.name!r}")
    in_features = int(tensor.shape[0])  # ggml order: ne0 = in, ne1 = out
    packed = torch.from_numpy(tensor.data.copy())  # (out, in / 32 * block_bytes) uint8
    if row_order is not None:
        packed = packed[row_order].contiguous()
    return GGUFLinear(packed, fmt.name, in_features, tensor_name=f"GGUF tensor {tensor.name!r}")


def llama_module_name(tensor_name: str) -> str | None:
    """The transformers module of a GGUF Llama tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj``), or None for tensors that are not block linears."""
    match = _BLOCK_TENSOR.fullmatch(tensor_name)
    if match is None or match.group(2) not in LLAMA_LINEARS:
        return None
    return f"model.layers.{match.group(1)}.{LLAMA_LINEARS[match.group(2)]}"


def replace_llama_linears(
    model: nn.Module, path: str | os.PathLike[str], only: Iterable[str] | None = None
) -> list[str]:
    """Replace the block linears of a transformers Llama ``model`` (built from the same GGUF
    file's config) by ``GGUFLinear`` modules read from ``path``; returns the replaced names.

    ``only``: GGUF tensor kinds to replace (e.g. ``["attn_q", "attn_v"]``), default all of
    ``LLAMA_LINEARS``; an unknown kind is refused. Embeddings and norms stay as they are.

    The file must be made for this model: its ``llama.block_count``,
    ``llama.attention.head_count`` and ``llama.attention.head_count_kv`` (when absent,
    ``head_count``, as llama.cpp reads it; either may also be one equal count per block) must
    equal the model config's ``num_hidden_layers``, ``num_attention_heads`` and
    ``num_key_value_heads`` (the head counts give the q/k row order), and every block must hold
    every requested kind. Raises ``UserError`` (naming the file, the field or tensor, and both
    values) if not, if the file is not a Llama, if a header value is malformed (``gguf_header``),
    or if a tensor does not fit the module it replaces (checked before any row is reordered);
    nothing is replaced then.
    """
    kinds = _requested_kinds(only)
    reader = _reader(path)
    architecture = header_string(reader, path, "general.architecture")
    if architecture != "llama":
        raise UserError(f"GGUF file '{path}' holds a {architecture!r} model; only llama is read")
    blocks, heads_q, heads_kv = _check_config(reader, model, path)
    found = {}
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.fullmatch(tensor.name)
        if match is not None and match.group(2) in kinds:
            found[int(match.group(1)), match.group(2)] = tensor
    missing = [
        f"blk.{index}.{kind}.weight"
        for index in range(blocks)
        for kind in LLAMA_LINEARS
        if kind in kinds and (index, kind) not in found
    ]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise UserError(
            f"GGUF file '{path}' lacks {shown}{more}: each of its {blocks} blocks "
            f"(llama.block_count) must hold every kind asked for ({', '.join(sorted(kinds))}); "
            "use a complete file, or pass only= the kinds it holds"
        )
    replacements = {}
    for (_, kind), tensor in found.items():  # in the file's order
        name = llama_module_name(tensor.name)
        rows = _check_fits(model, name, tensor)  # before any row is reordered
        heads = {"attn_q": heads_q, "attn_k": heads_kv}.get(kind)
        order = None if heads is None else _rotary_order(rows, heads, tensor.name, path)
        replacements[name] = gguf_linear(tensor, order)
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return list(replacements)


def _requested_kinds(only: Iterable[str] | None) -> set[str]:
    """The GGUF tensor kinds to read (``only``, default all); ``UserError`` for unknown ones."""
    if only is None:
        return set(LLAMA_LINEARS)
    kinds = [only] if isinstance(only, str) else list(only)
    unknown = [kind for kind in kinds if kind not in LLAMA_LINEARS]
    if unknown:
        raise UserError(
            f"only={kinds!r}: unknown GGUF tensor kind(s) {unknown}; choose among "
            f"{', '.join(LLAMA_LINEARS)} (the GGUF names of q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj)"
        )
    return set(kinds)


def _check_config(reader, model: nn.Module, path) -> tuple[int, int, int]:
    """``(blocks, heads, kv heads)`` of the file, once each equals the model config's (else
    ``UserError`` naming the file, the field and both values)."""
    config = getattr(model, "config", None)

    def file_value(key: str, default: int | None = None, blocks: int | None = None) -> int:
        value = header_count(reader, path, key, blocks)
        if value is not None:
            return value
        if default is None:
            raise UserError(
                f"GGUF file '{path}' has no {key}, which llama.cpp requires too; the file is "
                "incomplete: use a complete GGUF file"
            )
        return default

    def model_value(name: str) -> int:
        value = getattr(config, name, None)
        if value is None and name == "num_key_value_heads":  # transformers' default too
            value = getattr(config, "num_attention_heads", None)
        if value is None:
            raise UserError(
                f"this {type(model).__name__} has no config.{name} to check GGUF file "
                f"'{path}' against; build the model from the GGUF file's config (transformers' "
                "LlamaConfig)"
            )
        return int(value)

    blocks = file_value("llama.block_count")
    heads = file_value("llama.attention.head_count", blocks=blocks)
    kv_field = "llama.attention.head_count_kv"
    kv_note = "" if kv_field in reader.fields else " (none given: llama.cpp then takes head_count)"
    values = [
        ("llama.block_count", blocks, "num_hidden_layers", ""),
        ("llama.attention.head_count", heads, "num_attention_heads", ""),
        (kv_field, file_value(kv_field, heads, blocks), "num_key_value_heads", kv_note),
    ]
    for key, value, name, note in values:
        wanted = model_value(name)
        if value != wanted:
            raise UserError(
                f"GGUF file '{path}' does not match this model: its {key} = {value}{note}, "
                f"the model config's {name} = {wanted}. Build the model from this GGUF file's "
                "config, or read the GGUF file made from this model; nothing was replaced"
            )
    return values[0][1], values[1][1], values[2][1]


def _check_fits(model: nn.Module, name: str, tensor) -> int:
    """The rows of GGUF ``tensor`` once it fits module ``name`` of ``model``: (out, in) equal,
    no bias (else ``UserError`` naming both). Judged from the tensor's header alone."""
    tensor_name = tensor.name
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"GGUF tensor {tensor_name!r}: the model has no module {name!r}") from None
    expected = (getattr(current, "out_features", None), getattr(current, "in_features", None))
    dims = [int(size) for size in tensor.shape]  # ggml order: in, out, then 1s
    shape = tuple(reversed(dims[:2])) if len(dims) >= 2 and set(dims[2:]) <= {1} else tuple(dims)
    if expected != shape:
        shown = f"({', '.join(map(str, shape))})"
        raise UserError(
            f"GGUF tensor {tensor_name!r} is {shown} but {name!r} is {expected}; build the "
            "model from this GGUF file's config"
        )
    if getattr(current, "bias", None) is not None:
        raise UserError(f"{name!r} has a bias, which GGUF tensor {tensor_name!r} does not hold")
    return shape[0]


def _rotary_order(rows: int, heads: int, tensor_name: str, path) -> torch.Tensor:
    """``rotary_row_order(rows, heads)``, once ``rows`` is a whole number of rotary pairs per
    head (``rows % (2 * heads) == 0``, else ``UserError`` naming the tensor and both counts)."""
    if rows % (2 * heads):
        raise UserError(
            f"GGUF tensor {tensor_name!r} of '{path}' has {rows} rows, not a multiple of 2 x its "
            f"{heads} heads (llama.cpp interleaves each head's rows in rotary pairs): build the "
            "model from this GGUF file's config (an even head_dim); nothing was replaced"
        )
    return rotary_row_order(rows, heads)
