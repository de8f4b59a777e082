"""What loading an adapter file into a model will do (``load_targets``), worked out before
anything changes: the config to inject (``modules_to_save`` and ``target_parameters`` entries
that name nothing dropped, PEFT's MoE conversion), the modules it adapts, wraps and gives token
rows, and every tensor the file must hold for them (``file_tensors.adapter_file_tensors``).
``lorakit.io.load`` then checks and applies it.

A ``<path>.base_layer.weight`` of a module the file does not adapt (PEFT's save of one adapter
of a model whose other adapter wraps ``<path>``: ``stray_weights.stray_base_layer_module``) is treated
as PEFT's load treats it: written into the base weight when another adapter of the model
already wraps ``<path>`` in a LoRA layer, else left out of the checks and the load with a
``StrayBaseWeightWarning`` (``_stray_base_weights``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, listed
from lorakit.io.file_tensors import FileTensor, adapter_file_tensors
from lorakit.io.keys import (
    adapted_base_key,
    base_weight_key,
    embedding_module_names,
    key_names_module,
)
from lorakit.io.moe_files import (
    ExpertConversion,
    converted_config,
    converted_header,
    expert_conversion,
)
from lorakit.io.read import AdapterHeader
from lorakit.io.stray_weights import (
    StrayBaseWeightWarning,
    stray_base_layer_module,
    stray_base_weight_message,
)
from lorakit.layers import LoraLayer
from lorakit.layers.token_checks import TokenIdsOutsideVocabulary
from lorakit.moe_entries import writers_version
from lorakit.moe_targets import convert_moe_config, fused_moe_family
from lorakit.parameter_targets import find_parameter_targets, unmatched_parameter_entries
from lorakit.targets import TASK_HEADS, find_targets, saved_module_matches
from lorakit.wrapped_modules import saved_module_names, token_module_names

__all__ = ["LoadTargets", "load_targets"]


@dataclass(frozen=True)
class LoadTargets:
    """What loading a file into a model will do: inject ``config`` into ``targets`` (and wrap
    ``saved_names``), filling the file tensors ``tensors`` lists."""

    config: LoraConfig
    targets: list[str]
    saved_names: list[str]
    tensors: list[FileTensor]
    parameter_targets: dict[str, str]
    """``{LoRA layer path: parameter path}`` (``target_parameters``)."""
    source: object = None
    """The adapter's directory (for messages)."""
    header: AdapterHeader | None = None
    """The header as the checks see it: the file's, or a transformers-4 per-expert MoE file's
    as converted (``expert_conversion``)."""
    expert_conversion: ExpertConversion | None = None
    """How the file's tensors become the ones ``tensors`` lists, if they need converting."""


def load_targets(
    model: nn.Module, adapter: AdapterHeader, modules: dict[str, nn.Module]
) -> LoadTargets:
    """The config to inject (``modules_to_save`` entries that name no module and have no
    tensor dropped, e.g. peft's automatic "classifier"/"score", and ``target_parameters``
    entries that match no parameter where another does) and the tensors it implies. A
    transformers-4 per-expert MoE file is planned as the fused file PEFT converts it into
    (``lorakit.io.moe_files``; its tensors are fused once read)."""
    config = _without_absent_saved_modules(adapter, modules)
    source = adapter.directory
    try:
        written_by = writers_version(adapter, model)  # its writer's rule (moe_entries)
        config = convert_moe_config(model, config, warn=False, written_by=written_by)
        targets = find_targets(model, config, modules)
        saved_names = saved_module_names(model, config)
        tokens = token_module_names(model, config, targets, saved_names)
        parameter_targets = find_parameter_targets(model, config, file_config=True)
    except TokenIdsOutsideVocabulary as error:  # (a ValueError: first)
        raise AdapterFileError(_vocabulary_message(adapter, error)) from None
    except ValueError as error:
        raise AdapterFileError(f"adapter {source} does not fit this model: {error}") from None
    config = _without_unmatched_parameters(config, parameter_targets)
    if not targets and not parameter_targets:
        raise AdapterFileError(
            f"adapter {source}: target_modules={config.target_modules!r} matches no module of "
            f"this {type(model).__name__}; was it trained on another architecture?"
        )
    heads_from_base = _task_heads_not_in_file(adapter, config, saved_names)
    embeddings = [
        name
        for name in embedding_module_names(model, modules)
        if base_weight_key(name, name in targets, name in tokens) in adapter.tensors
    ]
    tensors = adapter_file_tensors(
        model,
        config.bias,
        targets,
        [name for name in saved_names if name not in heads_from_base],
        embeddings,
        modules,
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
        token_modules={name: len(indices) for name, indices in tokens.items()},
        parameter_layers=parameter_targets,
    )
    written, adapter = _stray_base_weights(model, adapter, set(targets) | set(tokens), modules)
    tensors += written
    family = fused_moe_family(model)
    conversion = expert_conversion(adapter, adapter.config, family, tensors, modules)
    header = adapter
    if conversion is not None:  # a transformers-4 per-expert file, planned as the fused one
        header = converted_header(adapter, conversion)
        config = converted_config(config, conversion)
    return LoadTargets(
        config, targets, saved_names, tensors, parameter_targets, source, header, conversion
    )


def _vocabulary_message(adapter: AdapterHeader, error: TokenIdsOutsideVocabulary) -> str:
    """The refusal of a file whose token rows (``trainable_token_indices``) lie beyond the
    model's vocabulary: it was trained on a resized one. With the embedding's full weight in
    the file (``save_embedding_layers``) its row count N is known: call
    ``resize_token_embeddings(N)``, as the LoRA-embedding path says (``load_checks``)."""
    name, size = error.module_name, error.size
    saved = adapter.tensors.get(base_weight_key(name, False, token_rows=True))
    found = (
        f"token ids {error.ids} of {name!r} are outside this model's vocabulary of {size} "
        "tokens: the adapter was trained on a resized vocabulary"
    )
    if saved is not None:
        rows = saved.shape[0]
        advice = f" of {rows} tokens; call model.resize_token_embeddings({rows}) before loading it."
    else:
        advice = (
            f" of more than {max(error.ids)} tokens (the file does not hold the embedding, so "
            "its size is not known); call model.resize_token_embeddings(N) with the size it "
            "was trained with (the tokenizer's len()) before loading it."
        )
    return f"adapter {adapter.directory}: {found}{advice}"


def _stray_base_weights(
    model: nn.Module, adapter: AdapterHeader, adapted: set[str], modules: dict[str, nn.Module]
) -> tuple[list[FileTensor], AdapterHeader]:
    """``(tensors, header)`` for the file's ``<path>.base_layer.weight`` keys of modules of
    this model it does not adapt (``adapted``: its targets and token-row modules; ``keys.
    stray_base_layer_module``: a frozen base weight PEFT's save carried over from another
    adapter of the saved model), as PEFT's non-strict load treats them: ``tensors``, those of
    the paths another adapter of this model already wraps in a LoRA layer (the key is that
    layer's base weight's, so PEFT writes it there: planned as "base_weight" tensors); ``header``, the
    header without the others (the key fits no parameter of a plain module, so PEFT ignores
    it), a ``StrayBaseWeightWarning`` naming them. A path that is no module of this model
    stays in the header (``check_tensors`` refuses it: another architecture)."""
    written, dropped = [], []
    for key in adapter.tensors:
        path = stray_base_layer_module(key, adapted)
        if path is None or path not in modules:
            continue
        if isinstance(model.get_submodule(path), LoraLayer):  # wrapped by another adapter
            written.append(path)
        else:
            dropped.append(key)
    written = [
        FileTensor(adapted_base_key(n, "weight"), n, "base_weight", "weight") for n in written
    ]
    if not dropped:
        return written, adapter
    what = "it is left out, as PEFT's load leaves it out where that module is not adapted"
    warnings.warn(
        stray_base_weight_message(f"adapter {adapter.directory}", dropped, what),
        StrayBaseWeightWarning,
        stacklevel=5,  # load_adapter's caller (<- load_targets <- _load_checked <- load_adapter)
    )
    kept = {key: info for key, info in adapter.tensors.items() if key not in dropped}
    return written, dataclasses.replace(adapter, tensors=kept)


def _without_absent_saved_modules(
    adapter: AdapterHeader, modules: dict[str, nn.Module]
) -> LoraConfig:
    """The file's config without the ``modules_to_save`` entries that name no module of the
    model and have no tensor in the file (e.g. peft's automatic "classifier" / "score")."""
    config = adapter.config
    names = [name for name in modules if name]
    saved = config.modules_to_save or []
    kept = [
        entry
        for entry in saved
        if any(saved_module_matches([entry], n) for n in names) or _has_tensors_for(adapter, entry)
    ]
    return config if kept == saved else config.replace(modules_to_save=kept or None)


def _without_unmatched_parameters(
    config: LoraConfig, parameter_targets: dict[str, str]
) -> LoraConfig:
    """``config`` without the ``target_parameters`` entries that match no parameter of the
    model (a file's config is held to its tensors, as PEFT loads it, not to every entry: see
    ``find_parameter_targets(file_config=True)``), so that the config the model records, and
    ``save_adapter`` writes, passes ``inject``'s every-entry check."""
    entries = config.target_parameters or []
    unmatched = unmatched_parameter_entries(entries, parameter_targets)
    if not unmatched:
        return config
    kept = [entry for entry in entries if entry not in unmatched]
    return config.replace(target_parameters=kept)


def _task_heads_not_in_file(
    adapter: AdapterHeader, config: LoraConfig, saved_names: list[str]
) -> list[str]:
    """The saved modules that only the task type implies (``targets.TASK_HEADS``, not an entry
    of the file's own ``modules_to_save``) and of which the file holds no tensor: a
    ``TOKEN_CLS`` / ``QUESTION_ANS`` file saved by lorakit before it trained those heads
    (review 33). They are wrapped as for any file of that task type, their trained copy
    starting as the model's own head, which is what the file's model used; a
    ``TaskHeadFromBaseWarning`` says so. Required, a missing head was an error blaming the file
    or the base."""
    if config.task_type not in _HEADS_SAVED_SINCE_33:  # (SEQ_CLS heads always were saved:
        return []  # a SEQ_CLS file without its head is incomplete, refused as such)
    own = config.modules_to_save or []
    implied = [head for head in TASK_HEADS[config.task_type] if head not in own]
    found = [
        name
        for name in saved_names
        if saved_module_matches(implied, name)
        and not saved_module_matches(own, name)
        and not _has_tensors_for(adapter, name)
    ]
    if found:
        warnings.warn(
            f"adapter {adapter.directory} (task_type={config.task_type!r}) holds no tensors for "
            f"the task head {listed(set(found), 3)}, which PEFT trains and saves for that task "
            "type (an older lorakit did not): the head is this model's own, as it was when the "
            "adapter was trained; save the adapter again to store it",
            TaskHeadFromBaseWarning,
            stacklevel=5,  # load_adapter's caller (<- load_targets <- _load_checked <- load_adapter)
        )
    return found


_HEADS_SAVED_SINCE_33 = ("TOKEN_CLS", "QUESTION_ANS")
"""The task types whose heads lorakit trains and saves only since round 33 (SEQ_CLS's it
always did): only their files may lack the head."""


class TaskHeadFromBaseWarning(UserWarning):
    """A ``TOKEN_CLS`` / ``QUESTION_ANS`` adapter file without its task head's tensors (saved
    by lorakit before it trained them, as PEFT does): the head is the model's own."""


def _has_tensors_for(adapter: AdapterHeader, entry: str) -> bool:
    return any(key_names_module(key, entry) for key in adapter.tensors)
