"""A PEFT-format adapter -> a GGUF LoRA adapter file as llama.cpp reads it.

llama.cpp (``llama-adapter.cpp``, ``llama-graph.cpp``) reads ``general.type = "adapter"``,
``adapter.type = "lora"``, one float ``adapter.lora.alpha`` for the whole file and, per adapted
tensor ``T`` of the base GGUF, ``T.lora_a`` / ``T.lora_b`` with ``ne = [in, r]`` / ``[r, out]``
(numpy ``(r, in)`` / ``(out, r)``: PEFT's own layout). It computes::

    y = W x + (alpha / r) * B (A x),   r = lora_b's ne[0]

For ``token_embd`` it reads ``lora_a`` transposed (numpy ``(vocab, r)``) and adds
``(alpha / r) * B A[:, token]``. lorakit's scale per module is ``s = alpha_m / r_m`` (or
``alpha_m / sqrt(r_m)`` with rsLoRA, with ``rank_pattern`` / ``alpha_pattern``), so the file
carries one alpha (the most common ``|s * r|``) and each B is folded, ``B' = B * s r / alpha``
(``functional.fold_scale``): under llama.cpp's rule every module gets exactly its own ``s``.
The file's alpha is positive and never 0, which llama.cpp reads as scale 1: a negative ``s``
(PEFT allows a negative ``lora_alpha``) has its sign folded into B, an ``s`` of 0 gives
``B' = 0``, and an adapter whose every ``s`` is 0 (it changes nothing) is refused.
Llama's q/k B rows are put in llama.cpp's rotary order (``gguf_names.rope_row_order``).

llama.cpp adds the LoRA to the base GGUF as it is, and no base weights are read here: a PiSSA /
OLoRA adapter saved without conversion (by PEFT or lorakit), whose factors only fit the residual
base its init made, is refused before anything is read or written
(``lorakit.io.read.refuse_residual_base_factors``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, UserError
from lorakit.export.gguf_adapter_checks import (
    check_fits,
    refuse_dora,
    refuse_other_base_class,
    refuse_unmapped_layout,
    refuse_unsupported,
    why_not_exportable,
    why_not_lora,
)
from lorakit.export.gguf_io import encode_tensor, write_gguf
from lorakit.export.gguf_names import (
    TOKEN_EMBEDDING,
    GgufLayout,
    check_head_size,
    gguf_layout,
)
from lorakit.functional import fold_scale, scaling

__all__ = ["ADAPTER_TYPES", "AdapterExport", "export_adapter"]

# lora_b (ne=[r, out]) rows are r values long: too short for q8_0/q4_0 blocks of 32 unless r is
# a multiple of 32 (lora_a, ne=[in, r], has rows of the input size)
ADAPTER_TYPES = ("f32", "f16", "bf16")


@dataclass
class AdapterExport:
    """What ``export_adapter`` wrote: the file, its alpha, the modules, what it left out."""

    path: Path
    arch: str
    alpha: float
    modules: dict[str, str] = field(default_factory=dict)  # transformers module -> GGUF tensor
    dropped: list[str] = field(default_factory=list)  # "what: why" for each tensor left out


def export_adapter(
    adapter_directory: str | os.PathLike[str],
    model: nn.Module,
    output: str | os.PathLike[str],
    *,
    drop_unsupported: bool = False,
    tensor_type: str = "f32",
    base_name: str | None = None,
) -> AdapterExport:
    """Write the PEFT adapter in ``adapter_directory`` (trained on ``model``'s architecture) as a
    GGUF LoRA adapter at ``output``. What llama.cpp cannot apply (trained biases, full
    ``modules_to_save`` copies, resized or changed embeddings, modules without a GGUF tensor;
    not PEFT's copy of the model's own embedding, which is skipped) raises
    ``UserError`` naming it and why, unless ``drop_unsupported`` (then listed in ``.dropped``).
    DoRA is always refused, and so are unconverted PiSSA / OLoRA adapters (``AdapterFileError``,
    module docstring) and an adapter whose ``auto_mapping.base_model_class`` is not ``model``'s
    class. ``model`` may be lorakit's ``PeftModel`` (its base model is used);
    ``base_name`` says which model it is in messages (the CLI: its ``--model``). A file of
    peft < 0.22 is read with its writer's ``modules_to_save`` rule (``io.older_peft_files``)."""
    from lorakit.io.older_peft_files import read_as_written
    from lorakit.io.read import read_adapter_data, read_adapter_header
    from lorakit.io.residual_base import refuse_residual_base_factors
    from lorakit.state import adapter_model

    model = adapter_model(model)

    if tensor_type not in ADAPTER_TYPES:
        raise UserError(f"--type {tensor_type} for an adapter: choose one of {ADAPTER_TYPES}")
    refuse_dora(Path(adapter_directory))
    refuse_other_base_class(Path(adapter_directory), model, base_name)
    header = read_adapter_header(adapter_directory)
    refuse_residual_base_factors(header, "exporting it as a GGUF LoRA for the original model")
    adapter = read_adapter_data(read_as_written(header, model))  # its peft's entries and rules
    adapter.require_finite()
    refuse_unmapped_layout(adapter, model)
    layout = gguf_layout(model.config)
    check_head_size(model.config)  # llama.cpp could not load the base this adapter is for
    pairs, unsupported = _split_tensors(adapter, layout, model, base_name)
    if unsupported and (not drop_unsupported or not pairs):
        refuse_unsupported(adapter.directory, unsupported, nothing_left=not pairs)
    if not pairs:
        raise UserError(f"adapter {adapter.directory}: no LoRA pair is left to export")
    file_alpha, tensors = _llama_cpp_tensors(
        pairs, adapter.config, layout, tensor_type, adapter.directory
    )

    def fill(writer) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(file_alpha))
        for tensor_name, (data, qtype) in tensors.items():
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)

    path = write_gguf(output, layout.arch, fill)
    modules = {module: pair[0] for module, pair in pairs.items()}
    return AdapterExport(path, layout.arch, float(file_alpha), modules, unsupported)


def _llama_cpp_tensors(
    pairs, config, layout: GgufLayout, tensor_type: str, directory: Path | None = None
):
    """``(file alpha, {GGUF tensor name: encoded})``: each module's B folded to its own scale
    under ``alpha / r``, q/k rows in llama.cpp's order, token_embd's A transposed."""
    scales = {
        m: scaling(A.shape[0], config.alpha_for(m), config.use_rslora)
        for m, (_, A, _) in pairs.items()
    }
    file_alpha = _file_alpha([scales[m] * A.shape[0] for m, (_, A, _) in pairs.items()], directory)
    tensors = {}
    for module, (name, lora_A, lora_B) in pairs.items():
        lora_B = fold_scale(lora_B, scales[module], file_alpha / lora_A.shape[0])  # (out, r)
        order = layout.row_order(name, lora_B.shape[0])
        if order is not None:
            lora_B = lora_B[order]  # llama.cpp's rotary row order, as for the base weight
        if name == TOKEN_EMBEDDING:
            lora_A = lora_A.T  # (vocab, r): llama.cpp gathers rows of A per token
        tensors[name + ".lora_a"] = encode_tensor(lora_A, tensor_type)
        tensors[name + ".lora_b"] = encode_tensor(lora_B, tensor_type)
    return file_alpha, tensors


def _file_alpha(effective_alphas: list[float], directory: Path | None = None) -> float:
    """The most common ``|s * r|`` other than 0 (so most B need no folding), as the float32
    llama.cpp reads: a positive alpha, since llama.cpp reads an alpha of 0 as scale 1 (a
    module whose ``s`` is 0, ``lora_alpha`` 0 as PEFT allows, gets ``B' = 0``, and a
    negative ``s`` has its sign folded into B by ``fold_scale``). ``UserError`` when every
    module's ``s`` is 0: the adapter changes nothing, and there is no alpha to write."""
    import numpy as np

    magnitudes = [abs(alpha) for alpha in effective_alphas if alpha != 0]
    if not magnitudes:
        raise UserError(
            f"adapter {directory}: lora_alpha is 0 for every module, so its scaling alpha / r "
            "is 0 and it changes nothing (as in PEFT); llama.cpp reads an alpha of 0 as scale "
            "1, not 0, so the file could only hold zeros. Nothing to export: train with a "
            "non-zero lora_alpha, or use the base model as it is."
        )
    return float(np.float32(Counter(magnitudes).most_common(1)[0][0]))


def _split_tensors(
    adapter, layout: GgufLayout, model: nn.Module, base_name: str | None = None
) -> tuple[dict[str, tuple[str, torch.Tensor, torch.Tensor]], list[str]]:
    """``({module: (GGUF tensor, A, B)}, ["what: why", ...])``: the exportable LoRA pairs and
    the tensors llama.cpp cannot apply."""
    from lorakit.io.keys import parse_lora_key

    factors: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    unsupported = []
    for key, tensor in adapter.tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            reason = why_not_lora(key, tensor, adapter.config, model)
            if reason is not None:  # (None: a copy of the model's own embedding, nothing to add)
                unsupported.append(f"{key}: {reason}")
            continue
        module, role = parsed
        factors.setdefault(module, {})[role] = tensor
        if "lora_embedding_" in key:
            embeddings.add(module)
    pairs = {}
    for module, factor in factors.items():
        reason = why_not_exportable(module, module in embeddings, layout)
        if reason is not None:
            unsupported.append(f"{module} (LoRA): {reason}")
            continue
        if set(factor) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(factor)).pop()
            raise AdapterFileError(
                f"adapter {adapter.directory}: module {module} has no {missing}; the file is "
                "broken, re-save the adapter."
            )
        lora_A, lora_B = factor["lora_A"], factor["lora_B"]
        fit = (module in embeddings, lora_A, lora_B)
        check_fits(adapter.directory, model, module, *fit, base_name=base_name)
        pairs[module] = (layout.tensor_name(module), lora_A, lora_B)
    return pairs, unsupported
