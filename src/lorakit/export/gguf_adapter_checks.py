"""What a GGUF LoRA adapter cannot carry, refused (or listed for ``--drop-unsupported``) before
``lorakit.export.gguf_adapter`` writes anything: DoRA magnitudes, a base of another GGUF
architecture than the adapter's recorded class, a bare decoder's adapter (module paths without
the CausalLM's ``model.``), replicated layers and bare parameters (no GGUF tensor to hold
them), trained biases and ``modules_to_save`` copies, resized or changed embeddings
(``gguf_non_lora_tensors``), modules llama.cpp has no tensor for, and factors whose shapes do
not fit the base.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lorakit.errors import UserError
from lorakit.export.gguf_names import (
    ARCHITECTURES,
    TOKEN_EMBEDDING,
    GgufLayout,
    class_architecture,
    transformers_class,
)
from lorakit.export.gguf_non_lora_tensors import why_not_lora

__all__ = [
    "check_fits",
    "refuse_dora",
    "refuse_other_base_class",
    "refuse_unmapped_layout",
    "refuse_unsupported",
    "why_not_exportable",
    "why_not_lora",
]


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


def refuse_unmapped_layout(adapter, model: nn.Module) -> None:
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


def refuse_unsupported(directory: Path, unsupported: list[str], nothing_left: bool) -> None:
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


def _config_fields(directory: Path) -> dict:
    """adapter_config.json's fields as written (PEFT's too, which lorakit's ``LoraConfig`` does
    not keep), or {} for a file that cannot be read (``read_plain_lora`` reports it)."""
    from lorakit.io.adapter_dirs import adapter_directory
    from lorakit.io.config_json import CONFIG_NAME

    config_path = adapter_directory(directory) / CONFIG_NAME
    try:
        fields = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def refuse_other_base_class(directory: Path, model: nn.Module, base_name: str | None) -> None:
    """``UserError`` when adapter_config.json's ``auto_mapping.base_model_class`` (the class of
    the model PEFT made the adapter on, written when it had no ``task_type``) is of another GGUF
    architecture than ``model`` (``gguf_names.class_architecture``; a class lorakit writes no
    architecture for counts as another): same-sized modules of another architecture would be
    exported, and llama.cpp then refuses the file over the adapter's real base. Classes of one
    architecture (a Mistral adapter over a Llama: both ``llama``) give the same file and pass,
    unless the recorded class is a bare decoder (``_bare_decoder``) or keeps its decoder under
    another prefix: its paths then miss the given model's, and the refusal says how to re-root
    them. ``base_name`` names ``model``."""
    mapping = _config_fields(directory).get("auto_mapping")
    made_for = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    given = type(model).__name__
    if not isinstance(made_for, str) or made_for == given:
        return
    made_arch = class_architecture(made_for)
    given_arch = ARCHITECTURES.get(getattr(model.config, "model_type", None), (None,))[0]
    made_prefix = getattr(transformers_class(made_for), "base_model_prefix", None)
    given_prefix = getattr(model, "base_model_prefix", None)
    if made_arch is not None and made_arch == given_arch and _bare_decoder(made_for, model):
        raise UserError(_decoder_rooted(directory, made_for, model, "layers.N..."))
    if made_arch is not None and made_arch == given_arch and made_prefix != given_prefix:
        raise UserError(
            f"adapter {directory} was made for a {made_for} (adapter_config.json "
            f"auto_mapping.base_model_class), which keeps its decoder under "
            f"{made_prefix!r} where the {type(model).__name__} given has {given_prefix!r}: "
            "its module paths name no layer of a GGUF model. Load it with PEFT onto a "
            f"{made_for}, move the decoder's LoRA to {given_prefix!r} paths, and save it again"
        )
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


def _bare_decoder(class_name: str, model: nn.Module) -> bool:
    """Whether the transformers class ``class_name`` is a bare decoder, a model without a head
    whose module paths start at its own layers (``layers.0.self_attn.q_proj``, no
    ``base_model_prefix`` submodule): the class of ``model.base_model`` (``Qwen2Model`` under a
    ``Qwen2ForCausalLM``), or the class ``AutoModel`` builds for its config type (a
    ``MistralModel`` under a ``LlamaForCausalLM``; ``MODEL_MAPPING_NAMES``). False where
    ``model`` is a bare decoder itself (its paths are rooted as the adapter's)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    base = getattr(model, "base_model", model)
    if base is model:  # ``model`` is a bare decoder itself: the paths are rooted alike
        return False
    if type(base).__name__ == class_name:
        return True
    config_class = getattr(transformers_class(class_name), "config_class", None)
    names = MODEL_MAPPING_NAMES.get(getattr(config_class, "model_type", None), ())
    return class_name in ((names,) if isinstance(names, str) else names)


def _decoder_rooted(directory: Path, made_for: str | None, model: nn.Module, module: str) -> str:
    """The refusal of an adapter made on a bare decoder (``made_for``: its recorded class, or
    None for a file that records none) for ``model``, which keeps that decoder under
    ``base_model_prefix``: its ``module`` paths miss the prefix, so no module would be found.
    The fix: the keys and the recorded class re-rooted (PEFT cannot load the file onto
    ``model``'s class as it is: it would miss every key and leave B at zero)."""
    given = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "model")
    made_on = (
        "a bare decoder"
        if made_for is None
        else f"a {made_for} (adapter_config.json auto_mapping.base_model_class), a bare decoder"
    )
    recorded = (
        ""
        if made_for is None
        else f", and set auto_mapping.base_model_class to {given} in adapter_config.json"
    )
    return (
        f"adapter {directory} was made on {made_on}: its module paths are rooted at the "
        f"decoder ({module}, no {prefix + '.'!r} prefix), where the {given} given keeps it "
        f"under {prefix!r} ({prefix}.{module}). Re-root it and save it again: in "
        f"adapter_model.safetensors put {prefix + '.'!r} after PEFT's 'base_model.model.' in "
        f"each key (base_model.model.{module} -> base_model.model.{prefix}.{module}){recorded}; "
        "lorakit export has no option for this"
    )


def refuse_dora(directory: Path) -> None:
    if _config_fields(directory).get("use_dora") is True:
        raise UserError(
            f"adapter {directory} is a DoRA adapter (use_dora: true): llama.cpp's LoRA format has "
            "no magnitude vectors, so it cannot be exported as a GGUF adapter (and dropping them "
            "would change every output). Export a full GGUF model with the adapter merged in "
            f"instead: lorakit export MODEL --adapter {directory} --format gguf --output "
            "MODEL.gguf (docs/gguf.md)."
        )


def why_not_exportable(module: str, is_embedding: bool, layout: GgufLayout) -> str | None:
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


def check_fits(source, model, module, is_embedding, lora_A, lora_B, *, base_name=None) -> None:
    """A (r, in) and B (out, r) must fit the model's module (embedding: A (r, vocab), B (dim, r));
    ``base_name`` names the model in the message."""
    base = base_name or f"the {type(model).__name__} given"
    try:
        weight = model.get_submodule(module).weight
    except AttributeError:
        if _under_base_model(model, module):
            raise UserError(_decoder_rooted(source, None, model, module)) from None
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


def _under_base_model(model: nn.Module, module: str) -> bool:
    """Whether ``module``, which ``model`` lacks, is a module of its decoder (``base_model``,
    under ``base_model_prefix``): an adapter made on a bare decoder whose file does not say so
    (a ``task_type`` and so no ``auto_mapping``)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return False
    try:
        base.get_submodule(module)
    except AttributeError:
        return False
    return True
