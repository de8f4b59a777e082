"""A PEFT-format adapter -> a GGUF LoRA adapter file as llama.cpp reads it.

llama.cpp (``llama-adapter.cpp``, ``llama-graph.cpp``) reads ``general.type = "adapter"``,
``adapter.type = "lora"``, one float ``adapter.lora.alpha`` for the whole file and, per adapted
tensor ``T`` of the base GGUF, ``T.lora_a`` / ``T.lora_b`` with ``ne = [in, r]`` / ``[r, out]``
(numpy ``(r, in)`` / ``(out, r)``: PEFT's own layout). It computes::

    y = W x + (alpha / r) * B (A x),   r = lora_b's ne[0]

For ``token_embd`` it reads ``lora_a`` transposed (numpy ``(vocab, r)``) and adds
``(alpha / r) * B A[:, token]``. lorakit's scale per module is ``s = alpha_m / r_m`` (or
``alpha_m / sqrt(r_m)`` with rsLoRA, with ``rank_pattern`` / ``alpha_pattern``), so the file
carries one alpha (the most common ``s * r``) and each B is folded, ``B' = B * s r / alpha``
(``functional.fold_scale``): under llama.cpp's rule every module gets exactly its own ``s``.
Llama's q/k B rows are put in llama.cpp's rotary order (``gguf_names.rope_row_order``).

llama.cpp adds the LoRA to the base GGUF as it is, and no base weights are read here: a PiSSA /
OLoRA adapter saved without conversion (by PEFT or lorakit), whose factors only fit the residual
base its init made, is refused before anything is read or written
(``lorakit.io.read.refuse_residual_base_factors``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterFileError, UserError
from lorakit.export.gguf_io import encode_tensor, write_gguf
from lorakit.export.gguf_names import (
    ARCHITECTURES,
    GgufLayout,
    check_head_size,
    class_architecture,
    gguf_layout,
)
from lorakit.functional import fold_scale, scaling

__all__ = ["ADAPTER_TYPES", "AdapterExport", "export_adapter"]

# lora_b (ne=[r, out]) rows are r values long: too short for q8_0/q4_0 blocks of 32 unless r is
# a multiple of 32 (lora_a, ne=[in, r], has rows of the input size)
ADAPTER_TYPES = ("f32", "f16", "bf16")
TOKEN_EMBEDDING = "token_embd.weight"


@dataclass
class AdapterExport:
    """What ``export_adapter`` wrote: the file, its alpha, the modules, what it left out."""

    path: Path
    arch: str
    alpha: float
    modules: dict[str, str] = field(default_factory=dict)  # transformers module -> GGUF tensor
    dropped: list[str] = field(default_factory=list)  # "what: why" for each tensor left out


def _merge_advice(model: nn.Module, adapter_directory: Path) -> str:
    """How to get a GGUF model with the adapter merged in: ``lorakit export`` where it writes
    the model's architecture (``gguf_names.ARCHITECTURES``), else ``lorakit merge`` and
    llama.cpp's own converter (MODEL: the base model's spec)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in ARCHITECTURES:
        return (
            "Merge it into a full GGUF model instead: lorakit export MODEL --adapter "
            f"{adapter_directory} --format gguf --output FILE.gguf."
        )
    return (
        f"lorakit's GGUF model export does not write model_type={model_type!r}: merge the "
        f"adapter with `lorakit merge --model MODEL --adapter {adapter_directory} --output "
        "MERGED`, then convert MERGED with llama.cpp's convert_hf_to_gguf.py."
    )


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
    ``base_name`` says which model it is in messages (the CLI: its ``--model``)."""
    from lorakit.io.read import read_plain_lora
    from lorakit.state import adapter_model

    model = adapter_model(model)

    if tensor_type not in ADAPTER_TYPES:
        raise UserError(f"--type {tensor_type} for an adapter: choose one of {ADAPTER_TYPES}")
    _refuse_dora(Path(adapter_directory))
    _refuse_other_base_class(Path(adapter_directory), model, base_name)
    adapter = read_plain_lora(
        adapter_directory, "exporting it as a GGUF LoRA for the original model"
    )
    adapter.require_finite()
    _refuse_unmapped_layout(adapter, model)
    layout = gguf_layout(model.config)
    check_head_size(model.config)  # llama.cpp could not load the base this adapter is for
    pairs, unsupported = _split_tensors(adapter, layout, model, base_name)
    if unsupported and (not drop_unsupported or not pairs):
        _refuse_unsupported(adapter.directory, unsupported, nothing_left=not pairs)
    if not pairs:
        raise UserError(f"adapter {adapter.directory}: no LoRA pair is left to export")
    file_alpha, tensors = _llama_cpp_tensors(pairs, adapter.config, layout, tensor_type)

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


def _refuse_unmapped_layout(adapter, model: nn.Module) -> None:
    """Refuse (``UserError``) an adapter whose modules have no GGUF LoRA tensor to become:
    replicated layers (``layer_replication``) or bare parameters (``target_parameters``)."""
    if adapter.config.layer_replication:
        raise UserError(
            f"adapter {adapter.directory} adapts replicated layers (layer_replication="
            f"{adapter.config.layer_replication!r}), which a GGUF model does not have. Merge it "
            "into a full GGUF model instead."
        )
    if adapter.config.target_parameters:
        raise UserError(
            f"adapter {adapter.directory} adapts bare parameters (target_parameters="
            f"{adapter.config.target_parameters!r}); llama.cpp's LoRA format holds pairs for "
            f"named weight matrices only. {_merge_advice(model, adapter.directory)}"
        )


def _refuse_unsupported(directory: Path, unsupported: list[str], nothing_left: bool) -> None:
    """Raise the ``UserError`` listing (the first four of) ``unsupported``: what the adapter
    holds that llama.cpp's LoRA format cannot carry, each with why. ``nothing_left``: no LoRA
    pair remains without them, so --drop-unsupported cannot help (only a merge can)."""
    listed = "; ".join(unsupported[:4]) + (
        f" ... ({len(unsupported)} in all)" * (len(unsupported) > 4)
    )
    instead = (
        "Nothing llama.cpp can apply remains without them (no file written): merge"
        if nothing_left
        else "Export without them with --drop-unsupported (drop_unsupported=True), or merge"
    )
    raise UserError(
        f"adapter {directory} holds what llama.cpp's LoRA format cannot carry: {listed}. "
        f"{instead} the adapter into a full GGUF model (lorakit export MODEL --adapter DIR)."
    )


def _llama_cpp_tensors(pairs, config, layout: GgufLayout, tensor_type: str):
    """``(file alpha, {GGUF tensor name: encoded})``: each module's B folded to its own scale
    under ``alpha / r``, q/k rows in llama.cpp's order, token_embd's A transposed."""
    scales = {
        m: scaling(A.shape[0], config.alpha_for(m), config.use_rslora)
        for m, (_, A, _) in pairs.items()
    }
    file_alpha = _file_alpha([scales[m] * A.shape[0] for m, (_, A, _) in pairs.items()])
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


def _config_fields(directory: Path) -> dict:
    """adapter_config.json's fields as written (PEFT's too, which lorakit's ``LoraConfig`` does
    not keep), or {} for a file that cannot be read (``read_plain_lora`` reports it)."""
    from lorakit.io.read import CONFIG_NAME, adapter_directory

    config_path = adapter_directory(directory) / CONFIG_NAME
    try:
        fields = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _refuse_other_base_class(directory: Path, model: nn.Module, base_name: str | None) -> None:
    """``UserError`` when adapter_config.json's ``auto_mapping.base_model_class`` (the class of
    the model PEFT made the adapter on, written when it had no ``task_type``) is of another GGUF
    architecture than ``model`` (``gguf_names.class_architecture``; a class lorakit writes no
    architecture for counts as another): same-sized modules of another architecture would be
    exported, and llama.cpp then refuses the file over the adapter's real base. Classes of one
    architecture (a Mistral adapter over a Llama: both ``llama``) give the same file and pass.
    ``base_name`` names ``model``."""
    mapping = _config_fields(directory).get("auto_mapping")
    made_for = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    given = type(model).__name__
    if not isinstance(made_for, str) or made_for == given:
        return
    made_arch = class_architecture(made_for)
    given_arch = ARCHITECTURES.get(getattr(model.config, "model_type", None), (None,))[0]
    if made_arch is not None and made_arch == given_arch:
        return
    base = base_name or f"the {given} given"
    made = (
        f"GGUF architecture {made_arch!r}" if made_arch else "no GGUF architecture lorakit writes"
    )
    raise UserError(
        f"adapter {directory} was made for a {made_for} (adapter_config.json "
        f"auto_mapping.base_model_class; {made}), but {base} is a {given} (GGUF architecture "
        f"{given_arch!r}): give the adapter's base model (--model), whose architecture the GGUF "
        "file names"
    )


def _refuse_dora(directory: Path) -> None:
    if _config_fields(directory).get("use_dora") is True:
        raise UserError(
            f"adapter {directory} is a DoRA adapter (use_dora: true): llama.cpp's LoRA format has "
            "no magnitude vectors, so it cannot be exported as a GGUF adapter (and dropping them "
            "would change every output)."
        )


def _file_alpha(effective_alphas: list[float]) -> float:
    """The most common ``s * r`` (so most B need no folding), as the float32 llama.cpp reads."""
    import numpy as np

    return float(np.float32(Counter(effective_alphas).most_common(1)[0][0]))


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
            reason = _why_not_lora(key, tensor, adapter.config, model)
            if reason is not None:  # (None: a copy of the model's own embedding, nothing to add)
                unsupported.append(f"{key}: {reason}")
            continue
        module, role = parsed
        factors.setdefault(module, {})[role] = tensor
        if "lora_embedding_" in key:
            embeddings.add(module)
    pairs = {}
    for module, factor in factors.items():
        reason = _why_not_exportable(module, module in embeddings, layout)
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
        _check_fits(adapter.directory, model, module, *fit, base_name=base_name)
        pairs[module] = (layout.tensor_name(module), lora_A, lora_B)
    return pairs, unsupported


def _why_not_lora(key: str, tensor: torch.Tensor, config, model: nn.Module) -> str | None:
    """Why a tensor that is not a LoRA factor (``keys.py`` lists what a file holds) cannot go
    into a llama.cpp adapter, or None for one that adds nothing to the model (PEFT's copy of a
    frozen embedding, ``_embedding_copy_problem``)."""
    from lorakit.io.keys import embedding_module_names, module_path
    from lorakit.targets import matches

    module = module_path(key).rsplit(".", 1)[0].removesuffix(".base_layer")
    if config.modules_to_save and matches(config.modules_to_save, module):
        return (
            "a full trained copy of a module (modules_to_save); llama.cpp adapters hold LoRA "
            "pairs only"
        )
    if key.endswith(".trainable_tokens_delta"):
        return (
            "trained rows of the token embedding (trainable_token_indices); llama.cpp adapters "
            "hold LoRA pairs only"
        )
    if key.endswith(".lora_B.bias"):
        return "a bias on lora_B (lora_bias=True); llama.cpp adapters hold LoRA pairs only"
    if key.endswith(".bias"):
        return "a trained bias (bias='all'/'lora_only'); llama.cpp adapters hold LoRA pairs only"
    if module in embedding_module_names(model):
        return _embedding_copy_problem(tensor, model.get_submodule(module).weight)
    return "a tensor that is not a LoRA factor"


def _embedding_copy_problem(saved: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when ``saved`` (an input/output embedding's weight in the adapter file) is the
    model's own ``weight``: PEFT saves the frozen base embedding of an adapter that targets
    ``embed_tokens`` / ``lm_head`` (``save_embedding_layers="auto"``), and the base GGUF holds
    it already. Its values are compared with the model's; a model built on the meta device (the
    CLI's: shapes only) cannot tell that copy from a trained embedding, so it is a reason too
    (with ``--drop-unsupported`` it is listed as dropped); a resized or changed embedding is."""
    if tuple(saved.shape) != tuple(weight.shape):
        return (
            f"a full embedding weight of shape {list(saved.shape)} for the model's "
            f"{list(weight.shape)} (a resized vocabulary); a llama.cpp adapter cannot change it"
        )
    if weight.is_meta:
        return (
            "a full embedding weight, which the command line cannot compare with the base's (it "
            "reads the base's shapes only): if it is PEFT's saved copy of the frozen embedding "
            "(save_embedding_layers), nothing is lost by --drop-unsupported; to have it checked, "
            "export from Python with the loaded base (lorakit.export.export_adapter); a llama.cpp "
            "adapter cannot change an embedding"
        )
    if _same_values(saved, weight.detach()):
        return None
    return (
        "a full embedding weight that differs from the model's (trained or changed, not a "
        "frozen copy, or the model is not the adapter's base); a llama.cpp adapter cannot "
        "change it"
    )


def _same_values(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal after rounding both to the less precise of their two dtypes (a bfloat16 adapter
    file saved from the model that is here in float32)."""
    dtypes = (saved.dtype, weight.dtype)
    dtype = (
        max(dtypes, key=lambda d: torch.finfo(d).eps)
        if all(d.is_floating_point for d in dtypes)
        else saved.dtype
    )
    return torch.equal(saved.to(dtype), weight.to(device=saved.device, dtype=dtype))


def _why_not_exportable(module: str, is_embedding: bool, layout: GgufLayout) -> str | None:
    name = layout.tensor_name(module)
    if name is None and layout.tied_embeddings and module.endswith("lm_head"):
        return "lm_head is tied to the token embedding; llama.cpp has no separate output tensor"
    if name is None:
        return f"no llama.cpp tensor for this module in the {layout.arch} architecture"
    if is_embedding != (name == TOKEN_EMBEDDING):
        return f"an embedding-layout LoRA on {name}, which llama.cpp reads as a matrix product"
    if name == TOKEN_EMBEDDING and layout.tied_embeddings:
        return (
            "the token embedding is tied to the output; llama.cpp aborts on a token_embd LoRA "
            "over a base without output.weight (its output projection is then token_embd itself, "
            "and the pair's transposed A does not fit that matrix product: GGML_ASSERT)"
        )
    return None


def _check_fits(source, model, module, is_embedding, lora_A, lora_B, *, base_name=None) -> None:
    """A (r, in) and B (out, r) must fit the model's module (embedding: A (r, vocab), B (dim, r));
    ``base_name`` names the model in the message."""
    base = base_name or f"the {type(model).__name__} given"
    try:
        weight = model.get_submodule(module).weight
    except AttributeError:
        raise UserError(
            f"adapter {source}: {base} has no module {module!r}; give the adapter's base model"
        ) from None
    rows, cols = weight.shape[::-1] if is_embedding else weight.shape  # (out, in)
    if lora_A.shape[1] != cols or lora_B.shape[0] != rows or lora_A.shape[0] != lora_B.shape[1]:
        raise UserError(
            f"adapter {source}: {module} has A {list(lora_A.shape)} and B {list(lora_B.shape)}, "
            f"which do not fit the weight {list(weight.shape)} of {base}; give the adapter's "
            "base model (--model)"
        )
