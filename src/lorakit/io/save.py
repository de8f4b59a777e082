"""Save adapters in PEFT's layout (merged models: ``lorakit.io.merged``).

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's key
names and config; header metadata ``{"format": "pt"}`` plus lorakit's base fingerprint and a copy
of the config). The adapter "default" goes to ``directory``, any other to
``directory/<adapter_name>``, as PEFT does. Both files are written atomically and the bytes are
deterministic (saving twice gives identical files).

An adapter marked with ``record_prompt_style`` (``lorakit train`` marks its adapter) also carries
the form of the prompts it was trained on under ``PROMPT_STYLE_METADATA_KEY``: "chat" (chat
messages through the tokenizer's chat template) or "plain" (prompt text as is), so that
``lorakit generate`` sends its prompt in that form (``recorded_prompt_style``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit import offloading
from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.init_methods import changes_base
from lorakit.io import atomic, fingerprint, fingerprint_json
from lorakit.io.config_json import CONFIG_NAME, config_to_json
from lorakit.io.file_tensors import adapter_file_tensors, model_tensor
from lorakit.io.header import serialize
from lorakit.io.keys import embedding_module_names
from lorakit.io.read import BASE_INIT_METADATA_KEY, CONFIG_METADATA_KEY, WEIGHTS_NAME
from lorakit.layers import LoraLayer, TrainableTokens
from lorakit.layers.parameter import LoraParameter
from lorakit.state import adapter_configs, adapter_model, lora_layers, saved_modules, state_of
from lorakit.targets import model_modules
from lorakit.train.sharded_model import refuse_sharded

__all__ = [
    "PROMPT_STYLES",
    "PROMPT_STYLE_METADATA_KEY",
    "adapter_file_contents",
    "record_prompt_style",
    "recorded_prompt_style",
    "save_adapter",
]

PROMPT_STYLE_METADATA_KEY = "lorakit.prompt_style"
PROMPT_STYLES = ("chat", "plain")


def record_prompt_style(model: nn.Module, style: str, adapter_name: str = "default") -> None:
    """Mark adapter ``adapter_name`` of ``model`` as trained on ``style`` prompts ("chat": chat
    messages rendered by the tokenizer's chat template; "plain": prompt text as is); every later
    save of it records the style in the file's header metadata (``PROMPT_STYLE_METADATA_KEY``),
    and loading such a file records it again."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: expected one of {PROMPT_STYLES}")
    _config_of(model, adapter_name)  # (a UserError naming the adapters when it is not one)
    state_of(model).prompt_styles[adapter_name] = style


def recorded_prompt_style(metadata: dict[str, str]) -> str | None:
    """The prompt style an adapter file's header ``metadata`` records ("chat" / "plain"); None
    for a file without the record (written by peft, or by lorakit outside ``lorakit train``)."""
    style = metadata.get(PROMPT_STYLE_METADATA_KEY)
    return style if style in PROMPT_STYLES else None


def _config_of(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise UserError(
            f"the model has no adapter named {adapter_name!r} (it has {sorted(configs)}); "
            "pass one of those as adapter_name."
        )
    return configs[adapter_name]


def _vocabulary_resized(model: nn.Module, config: LoraConfig) -> bool:
    """True when the base model's local ``config.json`` has another ``vocab_size`` (what PEFT
    checks; without a local base directory nothing can be compared and False is returned). The
    config's base may be a built-in's name; the directory the model was loaded from is then used."""
    candidates = (config.base_model_name_or_path, getattr(model, "name_or_path", None))
    base = next((c for c in candidates if c and (Path(c) / "config.json").is_file()), None)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if base is None or vocab_size is None:
        return False
    base_vocab = json.loads((Path(base) / "config.json").read_text()).get("vocab_size")
    return base_vocab is not None and base_vocab != vocab_size


# Names whose modules peft counts as embeddings when it decides "auto" (its EMBEDDING_LAYER_NAMES).
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _embedding_targeted(model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's test for ``save_embedding_layers="auto"``: a ``target_modules`` list holding
    ``embed_tokens`` or ``lm_head`` itself, or a regex matching a module so named."""
    spec = config.target_modules
    if isinstance(spec, str) and not config.targets_all_linear:
        return any(
            re.fullmatch(spec, name) and name.rsplit(".", 1)[-1] in _PEFT_EMBEDDING_NAMES
            for name, _ in model_modules(model)
        )
    return isinstance(spec, list) and any(name in spec for name in _PEFT_EMBEDDING_NAMES)


def _embeddings_to_save(
    model: nn.Module, config: LoraConfig, save_embedding_layers: bool | str | None
) -> list[str]:
    """Names of the embedding modules whose full weights go into the file.

    True / False: all / none. None: all when the vocabulary was resized (lorakit's default).
    "auto" (PEFT's default): as PEFT, the embeddings that are LoRA layers when an embedding is
    targeted (and no token rows are trained), else all when the vocabulary was resized."""
    if save_embedding_layers == "auto":
        targeted = _embedding_targeted(model, config) and not config.trainable_token_indices
        if targeted:
            return [
                name
                for name in embedding_module_names(model)
                if isinstance(model.get_submodule(name), LoraLayer)
            ]
        save_embedding_layers = None
    if save_embedding_layers is None:
        save_embedding_layers = _vocabulary_resized(model, config)
    return embedding_module_names(model) if save_embedding_layers else []


def adapter_file_entries(
    model: nn.Module, adapter_name: str, embeddings: list[str]
) -> tuple[list, list[str]]:
    """``(entries, LoRA layer names)``: every tensor of adapter ``adapter_name``'s file
    (``lorakit.io.file_tensors.FileTensor``: its key and the model tensor behind it; DoRA magnitudes,
    biases on B, trainable token rows and LoRA on bare parameters included) and the names of
    the LoRA layers holding the adapter; ``embeddings``: the embedding layers saved whole."""
    config = _config_of(model, adapter_name)
    layers = [(name, layer) for name, layer in lora_layers(model) if adapter_name in layer.ranks]
    holders = [(n, w) for n, w in saved_modules(model) if adapter_name in w.modules_to_save]
    saved = [name for name, w in holders if not isinstance(w, TrainableTokens)]
    tokens = {
        name: len(w.modules_to_save[adapter_name].indices)
        for name, w in holders
        if isinstance(w, TrainableTokens)
    }
    lora_names = [name for name, _ in layers]
    parameter_layers = {
        name: layer.parameter_path(name)
        for name, layer in layers
        if isinstance(layer, LoraParameter)
    }
    entries = adapter_file_tensors(
        model,
        config.bias,
        [name for name in lora_names if name not in parameter_layers],
        saved,
        embeddings,
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
        token_modules=tokens,
        parameter_layers=parameter_layers,
    )
    return entries, lora_names


def _warn_unfingerprinted(adapter_name: str, names: list[str]) -> None:
    """Warn that the base weights of ``names`` are left out of the saved fingerprint, so
    loading cannot check them: they are on the meta device with no accelerate offload map to
    read them from (a model built on the meta device; an offloaded weight is read from its map,
    ``fingerprint.offloaded_weight``, and recorded)."""
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")
    warnings.warn(
        f"adapter {adapter_name!r}: the base weights of {shown} are on the meta device with no "
        "accelerate offload map to read them from, so the saved base-model fingerprint leaves "
        "them out and loading cannot verify their base. Save with the base weights loaded "
        "(in memory, or offloaded with accelerate) to record them.",
        stacklevel=4,  # the caller of save_adapter
    )


def _saved_tensors(
    model: nn.Module, entries: list, adapter_name: str, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of ``entries`` as the file holds them (CPU copies, ``dtype`` given to
    the floating ones). A tensor accelerate offloaded (a model offloaded after its adapters
    were added: factors, saved copies, token rows on the meta device, their values in the
    hooks' maps) is read with its module loaded by its hook for the read
    (``offloading.loaded_for_reading``), so the file is the non-offloaded model's; one on the
    meta device with no map holds no value (``UserError`` naming it)."""
    held = [model_tensor(model, entry, adapter_name) for entry in entries]
    meta = [t for t in held if t.is_meta]  # (none unless accelerate offloaded them)
    offloaded = offloading.offloaded_holders(model, meta) if meta else []
    tensors = {}
    with offloading.loaded_for_reading(offloaded):
        for entry, tensor in zip(entries, held, strict=True):
            if meta:
                tensor = model_tensor(model, entry, adapter_name)  # (the loaded one)
            tensor = tensor.detach()
            if tensor.is_meta:
                raise UserError(
                    f"adapter {adapter_name!r}: tensor {entry.key!r} (module {entry.module!r}) "
                    "is on the meta device with no accelerate offload map to read it from: it "
                    "holds no values to save. Load or train the adapter on a model with real "
                    "weights (in memory, or offloaded with accelerate), then save."
                )
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[entry.key] = tensor.to("cpu", copy=True).contiguous()
    return tensors


def adapter_file_contents(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    save_embedding_layers: bool | str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """``(tensors, header metadata, config text)`` of adapter ``adapter_name``, as saved."""
    config = _config_of(model, adapter_name)
    embeddings = _embeddings_to_save(model, config, save_embedding_layers)
    entries, lora_names = adapter_file_entries(model, adapter_name, embeddings)
    tensors = _saved_tensors(model, entries, adapter_name, dtype)
    bases = [model.get_submodule(name).base_layer for name in lora_names]
    config_text = config_to_json(model, config, bases)
    fingerprints = fingerprint.compute(model, lora_names)
    _warn_unfingerprinted(adapter_name, [name for name in lora_names if name not in fingerprints])
    metadata = {
        "format": "pt",
        fingerprint.METADATA_KEY: fingerprint_json.to_metadata(fingerprints),
        CONFIG_METADATA_KEY: config_text,
    }
    if changes_base(config.init_lora_weights):  # the file says true (see config_json)
        metadata[BASE_INIT_METADATA_KEY] = config.init_lora_weights
    style = state_of(model).prompt_styles.get(adapter_name)
    if style is not None:  # (record_prompt_style)
        metadata[PROMPT_STYLE_METADATA_KEY] = style
    return tensors, metadata, config_text


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    save_embedding_layers: bool | str | None = None,
    initial_adapter: str | os.PathLike[str] | None = None,
) -> Path:
    """Save adapter ``adapter_name`` of ``model`` in PEFT's format; returns the directory used.

    ``dtype``: the dtype of the saved floating tensors (default: as they are in the model).
    ``save_embedding_layers``: also save the full input/output embedding weights, needed only
    when the vocabulary was resized (None: detected from the base model's local config.json;
    "auto": PEFT's rule, which also saves the targeted embeddings, see ``_embeddings_to_save``).
    ``initial_adapter``: the directory of this adapter saved right after a PiSSA/OLoRA init,
    before training: the adapter is then saved converted into a plain LoRA of twice the rank
    for the ORIGINAL base weights (PEFT's ``path_initial_model_for_weight_conversion``;
    ``lorakit.io.convert``).
    A save the file system refuses (a file at ``directory``, a full disk, a read-only place) is
    an ``atomic.SaveError`` (a ``UserError`` and an ``OSError``) naming the directory.
    """
    model = refuse_sharded(adapter_model(model), "lorakit.save_adapter")  # (FSDP: refused)
    target = Path(directory) if adapter_name == "default" else Path(directory) / adapter_name
    atomic.check_output_directory(target, "the adapter")  # (a file there: before the work)
    tensors, metadata, config_text = adapter_file_contents(
        model, adapter_name, dtype=dtype, save_embedding_layers=save_embedding_layers
    )
    if initial_adapter is not None:
        from lorakit.io.convert import converted_contents

        tensors, metadata, config_text = converted_contents(
            model, adapter_name, tensors, initial_adapter
        )
    # Both files staged, then renamed in under the directory's save lock: the old config out
    # first, the weights, the new config last (atomic.write_files), so that a crash between the
    # renames leaves no adapter_config.json (PEFT refuses the directory, lorakit loads it with
    # the config kept in the weights; saving again completes it), never the new weights beside
    # the old config.
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic.write_files(
            {
                target / WEIGHTS_NAME: serialize(tensors, metadata),
                target / CONFIG_NAME: config_text.encode("utf-8"),
            }
        )
    except OSError as error:  # (a SaveError, naming the directory, is an OSError too)
        raise atomic.save_failure(error, target, "the adapter") from error
    return target


# The weight files transformers writes and loads: one file, or an index and its numbered shards
# (``model-00001-of-00003.safetensors``; transformers' own clean-up removes only names of that form).
