"""GGUF LoRA adapter files (llama.cpp's format) read back into lorakit: the inverse of
``gguf_adapter``.

A file holds one ``adapter.lora.alpha`` and per GGUF tensor ``T`` a pair ``T.lora_a`` (numpy
``(r, in)``; ``(vocab, r)`` for ``token_embd``) and ``T.lora_b`` (``(out, r)``, Llama's q/k rows in
llama.cpp's rotary order). llama.cpp applies ``(alpha / r) B A`` to each, which is lorakit's rule
with ``lora_alpha = alpha`` and each module's own rank (a ``rank_pattern`` entry when it differs
from the most common one), so the adapter loads exactly; the q/k rows are put back in
transformers' order. ``load_gguf_adapter`` converts the file into a PEFT-format adapter in a
temporary directory and loads that with ``lorakit.load_adapter`` and all its checks.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterFileError
from lorakit.export.gguf_io import decode_tensor
from lorakit.export.gguf_names import TOKEN_EMBEDDING, gguf_layout

__all__ = [
    "GgufAdapter",
    "format_gguf_summary",
    "gguf_adapter_as_peft",
    "load_gguf_adapter",
    "read_gguf_adapter",
    "summarize_gguf_adapter",
]

SUFFIXES = (".lora_a", ".lora_b")
OUTPUT = "output.weight"  # lm_head's GGUF tensor (absent from a base whose head is tied)


@dataclass
class GgufAdapter:
    """A GGUF LoRA file, checked: ``pairs`` maps each GGUF tensor name to its ``gguf`` reader
    tensors ``(lora_a, lora_b)`` (data not decoded until ``factors`` is called)."""

    path: Path
    arch: str
    alpha: float
    pairs: dict[str, tuple[Any, Any]]

    def rank(self, name: str) -> int:
        """r = lora_b's ne[0], as llama.cpp takes it."""
        return int(self.pairs[name][1].shape[0])

    def scale(self, rank: int) -> float:
        """llama.cpp's scale of a pair of rank ``rank``: ``alpha / rank``, or 1 where the alpha
        is 0 or absent (read as 0)."""
        return self.alpha / rank if self.alpha != 0 else 1.0

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_a, lora_b)`` of ``name`` as float32 in numpy axis order, as stored."""
        lora_a, lora_b = self.pairs[name]
        return decode_tensor(lora_a), decode_tensor(lora_b)


def _field(reader, key: str, path: Path):
    field = reader.fields.get(key)
    if field is None:
        raise AdapterFileError(f"{path} has no {key!r}: it is not a GGUF LoRA adapter")
    return field.contents()


def read_gguf_adapter(path: str | os.PathLike[str]) -> GgufAdapter:
    """Open and check a GGUF LoRA adapter (keys, tensor names, complete pairs, shapes); every
    problem is an ``AdapterFileError``."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise AdapterFileError(f"{path} is not a readable GGUF file ({error})") from None
    kind, lora = _field(reader, "general.type", path), _field(reader, gguf.Keys.Adapter.TYPE, path)
    if kind != "adapter" or lora != "lora":
        raise AdapterFileError(
            f"{path} is a GGUF {kind!r} file of adapter type {lora!r}, not a LoRA adapter"
        )
    alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)  # llama.cpp: absent is 0
    alpha = 0.0 if alpha_field is None else float(alpha_field.contents())
    found: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        suffix = next((s for s in SUFFIXES if tensor.name.endswith(s)), None)
        if suffix is None:
            raise AdapterFileError(
                f"{path}: tensor {tensor.name} is not a .lora_a/.lora_b factor; lorakit reads "
                "LoRA pairs only (not the norm weights some tools add)"
            )
        found.setdefault(tensor.name.removesuffix(suffix), {})[suffix] = tensor
    pairs = {}
    for name, halves in found.items():
        if len(halves) != 2:
            raise AdapterFileError(f"{path}: the LoRA pair of {name} is missing one component")
        lora_a, lora_b = halves[".lora_a"], halves[".lora_b"]
        matrices = len(lora_a.shape) == 2 == len(lora_b.shape)
        rank_of_a = lora_a.shape[0] if name == TOKEN_EMBEDDING else lora_a.shape[-1]  # ne order
        if not matrices or rank_of_a != lora_b.shape[0]:
            raise AdapterFileError(
                f"{path}: {name} has lora_a ne={[int(n) for n in lora_a.shape]} and lora_b "
                f"ne={[int(n) for n in lora_b.shape]}, which are not two matrices sharing a rank"
            )
        pairs[name] = (lora_a, lora_b)
    if not pairs:
        raise AdapterFileError(f"{path} holds no LoRA pair")
    return GgufAdapter(path, str(_field(reader, "general.architecture", path)), alpha, pairs)


def gguf_adapter_as_peft(adapter: GgufAdapter, model: nn.Module):
    """``(LoraConfig, {PEFT key: tensor})`` of ``adapter`` for ``model``: the names mapped back
    to ``model``'s modules, q/k rows to transformers' order, ``token_embd``'s A transposed, and
    llama.cpp's scale kept: ``alpha / r`` of each pair's rank, 1 where alpha is 0 or absent,
    a negative alpha's sign moved into B (one positive alpha for the file's modules). A ``token_embd``
    pair for a model with tied embeddings is refused: llama.cpp cannot run it on that base."""
    from lorakit.config import LoraConfig
    from lorakit.io.keys import lora_keys
    from lorakit.targets import model_modules

    layout = gguf_layout(model.config)
    if adapter.arch != layout.arch:
        raise AdapterFileError(
            f"{adapter.path} is a LoRA for GGUF architecture {adapter.arch!r}; this "
            f"{type(model).__name__} is {layout.arch!r}"
        )
    modules = {layout.tensor_name(name): name for name, _ in model_modules(model) if name}
    tensors, ranks, b_keys = {}, {}, set()
    for name in adapter.pairs:
        module = _module_for(name, modules, layout.tied_embeddings, adapter.path, model)
        lora_a, lora_b = adapter.factors(name)
        order = layout.row_order(name, lora_b.shape[0])
        if order is not None:
            lora_b = lora_b[torch.argsort(order)]  # back to transformers' row order
        is_embedding = name == TOKEN_EMBEDDING
        lora_A = lora_a.T.contiguous() if is_embedding else lora_a
        key_A, key_B = lora_keys(module, is_embedding)
        tensors[key_A], tensors[key_B] = lora_A, lora_b.contiguous()
        b_keys.add(key_B)
        ranks[module] = lora_A.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(m): r for m, r in sorted(ranks.items()) if r != rank}
    alpha, alpha_pattern = abs(adapter.alpha), {}
    if adapter.alpha < 0:  # llama.cpp scales by alpha / r whatever its sign: the sign goes to B
        tensors = {key: -t if key in b_keys else t for key, t in tensors.items()}
    if alpha == 0:  # llama.cpp: scale 1 (alpha 0, or no alpha at all): alpha = each rank
        alpha, alpha_pattern = rank, others
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern=others,
        alpha_pattern=alpha_pattern,
        task_type="CAUSAL_LM",
    )
    return config, tensors


def _module_for(name: str, modules: dict, tied: bool, path: Path, model: nn.Module) -> str:
    """The name of ``model``'s module that the GGUF tensor ``name`` adapts (``modules``: GGUF
    tensor -> module), else ``AdapterFileError`` saying why none: ``output.weight`` for a model
    whose lm_head is ``tied`` to the token embedding, a ``token_embd`` pair on such a model
    (llama.cpp aborts on it), or a tensor the model has no module for."""
    kind = type(model).__name__
    module = modules.get(name)
    if module is None and name == OUTPUT and tied:
        raise AdapterFileError(
            f"{path} has a LoRA on {OUTPUT} (the output projection, lm_head), and this {kind} "
            f"ties lm_head to the token embedding (llama.cpp uses {TOKEN_EMBEDDING} as its "
            f"output, with no {OUTPUT}): the adapter was made for a base with an untied "
            "lm_head. Load it onto that base."
        )
    if module is None:
        raise AdapterFileError(f"{path}: tensor {name} names no module of this {kind}")
    if name == TOKEN_EMBEDDING and tied:
        raise AdapterFileError(
            f"{path} has a LoRA on {TOKEN_EMBEDDING}, and this {kind} ties its output to the "
            "token embedding: llama.cpp aborts on such a file over the tied base (no "
            "output.weight: its output projection is token_embd itself, which the pair's "
            "transposed A does not fit, GGML_ASSERT), so there is no llama.cpp result to "
            "reproduce. Use an untied base, or a PEFT-format adapter."
        )
    return module


def load_gguf_adapter(model: nn.Module, path: str | os.PathLike[str], adapter_name: str, **options):
    """``lorakit.load_adapter`` for a GGUF LoRA file: converted to a PEFT-format adapter in a
    temporary directory and loaded from there (same checks, same ``options``)."""
    from safetensors.torch import save_file

    from lorakit.io.config_json import CONFIG_NAME, config_to_json
    from lorakit.io.load import load_adapter
    from lorakit.io.read import WEIGHTS_NAME

    path = Path(path)
    config, tensors = gguf_adapter_as_peft(read_gguf_adapter(path), model)
    adapted = [model.get_submodule(name) for name in config.target_modules]
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-") as directory:
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        Path(directory, CONFIG_NAME).write_text(config_to_json(model, config, adapted))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load_adapter(model, directory, adapter_name, **options)
        except AdapterFileError as error:
            raise type(error)(str(error).replace(directory, str(path))) from None
    for warning in caught:  # the temporary directory's name means nothing to the caller
        text = str(warning.message).replace(directory, str(path))
        warnings.warn(text, warning.category, stacklevel=3)
    return model


def summarize_gguf_adapter(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``lorakit inspect FILE.gguf`` shows: architecture, alpha, ranks, llama.cpp's scales
    (``GgufAdapter.scale``: 1 where the alpha is 0 or absent, as ``load_adapter`` applies),
    tensor types, parameter count, file size, the GGUF tensors adapted."""
    adapter = read_gguf_adapter(path)
    names = sorted(adapter.pairs)
    ranks = Counter(adapter.rank(name) for name in names)
    types = Counter(t.tensor_type.name for pair in adapter.pairs.values() for t in pair)
    return {
        "file": str(adapter.path),
        "format": "GGUF LoRA adapter (llama.cpp)",
        "architecture": adapter.arch,
        "alpha": adapter.alpha,
        "adapted_tensors": len(names),
        "ranks": {str(rank): count for rank, count in sorted(ranks.items())},
        "scalings": {str(rank): adapter.scale(rank) for rank in sorted(ranks)},
        "tensor_types": dict(types),
        "parameters": sum(int(t.n_elements) for pair in adapter.pairs.values() for t in pair),
        "file_bytes": adapter.path.stat().st_size,
        "tensors": names,
    }


def format_gguf_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned ``label: value`` lines."""
    from lorakit.units import format_bytes

    tensors = summary["tensors"]
    shown = ", ".join(tensors[:3]) + (f", ... ({len(tensors)} in all)" if len(tensors) > 3 else "")
    rows = [
        ("adapter", summary["file"]),
        ("format", summary["format"]),
        ("architecture", summary["architecture"]),
        (
            "alpha",
            f"{summary['alpha']:g}" + (" (0 or absent: scale 1)" if not summary["alpha"] else ""),
        ),
        ("rank", ", ".join(f"{r} ({n} tensors)" for r, n in summary["ranks"].items())),
        ("scaling", ", ".join(f"{s:g} (r={r})" for r, s in summary["scalings"].items())),
        ("tensor types", ", ".join(f"{k} ({v})" for k, v in summary["tensor_types"].items())),
        ("parameters", f"{summary['parameters']:,}"),
        ("file size", format_bytes(summary["file_bytes"])),
        ("adapted", shown),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)
