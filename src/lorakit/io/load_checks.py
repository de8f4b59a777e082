"""The checks ``load_adapter`` makes before it changes the model (``lorakit.io.load``).

- ``check_tensors``: from the safetensors header alone (no data read): the file holds exactly
  the tensors its config implies for this model, each of the expected shape (a rank that
  disagrees with ``r`` / ``rank_pattern`` and a resized vocabulary are named as such) and of a
  fitting dtype;
- ``check_targets_take``: every target can take the adapter (inject's own checks: the layer
  kind, DoRA's support), and ``check_init_redo`` (``lorakit.io.init_redo``, imported here): a
  PiSSA / OLoRA / LoftQ init the file asks for can be redone as PEFT does;
(The base weights' check, ``check_base``, is in ``lorakit.io.base_checks``.)

Both raise ``AdapterFileError`` / ``BaseModelMismatchError`` naming the tensor or the layer and
the way out.
"""

from __future__ import annotations

from torch import nn

from lorakit import quantized
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, listed
from lorakit.inject_checks import check_adapter_fits, quantized_format
from lorakit.io.file_tensors import FileTensor, expected_shape
from lorakit.io.init_redo import check_init_redo, init_to_redo
from lorakit.io.keys import is_magnitude_key, saved_module_alias_keys
from lorakit.io.load_plan import LoadTargets
from lorakit.io.moved_moe_modules import refuse_moved_modules
from lorakit.io.read import AdapterHeader
from lorakit.io.tensors import TORCH_DTYPES
from lorakit.layers import layer_class_for
from lorakit.layers.parameter import parameter_layout
from lorakit.targets import original_module

__all__ = ["check_init_redo", "check_targets_take", "check_tensors", "init_to_redo"]

LORA_ROLES = ("lora_A", "lora_B")


def _refuse_copies_of_quantized(
    source: object, entries: list[FileTensor], modules: dict[str, nn.Module]
) -> None:
    """``AdapterFileError`` when the file keeps a full float copy (``modules_to_save``) of a
    module this model holds quantized: the copy's tensors cannot stand in for the packed ones
    (the file would otherwise be reported as lacking the quantized layer's tensors)."""
    for name in sorted({entry.module for entry in entries if entry.role == "saved"}):
        module = modules.get(name)
        if module is None or not quantized.is_quantized(module):
            continue
        try:
            kind = quantized.describe(module)
        except quantized.UnsupportedQuantizedLayerError:
            kind = type(module).__name__
        raise AdapterFileError(
            f"adapter {source} keeps a full float copy of {name!r} (modules_to_save), but this "
            f"model holds {name!r} quantized ({kind}), which that copy cannot stand in for. Load "
            f"the base with {name!r} unquantized (without quantization, or a format that leaves "
            "it in float, e.g. bitsandbytes nf4 / int8 for an output layer)."
        )


def _refuse_magnitudes_without_dora(source: object, config: LoraConfig, unexpected: list) -> None:
    """``AdapterFileError`` when the file holds DoRA magnitude vectors
    (``<path>.lora_magnitude_vector``) its config does not expect because it says
    ``use_dora=false``: a DoRA adapter whose config lost its flag, not another architecture."""
    magnitudes = [key for key in unexpected if is_magnitude_key(key)]
    if magnitudes and not config.use_dora:
        raise AdapterFileError(
            f"adapter {source} holds DoRA magnitude vectors ({listed(magnitudes, 6)}) but its "
            "adapter_config.json has use_dora=false (as plain LoRA it would leave out the "
            'magnitudes and compute another model). It is a DoRA adapter: set "use_dora": true '
            "in adapter_config.json and load it again."
        )


def check_tensors(
    adapter: AdapterHeader,
    config: LoraConfig,
    entries: list[FileTensor],
    modules: dict[str, nn.Module],
) -> None:
    """Keys, shapes, dtypes and ranks from the header; raises ``AdapterFileError`` naming the
    tensors."""
    source = adapter.directory
    expected = {entry.key for entry in entries}
    ignored = {
        alias
        for entry in entries
        if entry.role == "saved"
        for alias in saved_module_alias_keys(entry.module, entry.parameter)
    }
    missing = sorted(expected - set(adapter.tensors))
    unexpected = sorted(set(adapter.tensors) - expected - ignored)
    _refuse_copies_of_quantized(source, entries, modules)
    if missing:
        raise AdapterFileError(
            f"adapter {source} lacks tensors its config implies for this model: "
            f"{listed(missing, 6)}. The file is incomplete, or the model is not its base."
        )
    _refuse_magnitudes_without_dora(source, config, unexpected)
    refuse_moved_modules(adapter, config, unexpected, modules)  # (fused-MoE conversion)
    if unexpected:
        raise AdapterFileError(
            f"adapter {source} has tensors that fit no module of this model under its config: "
            f"{listed(unexpected, 6)}. Is the model the adapter's base architecture?"
        )
    for entry in sorted(entries, key=lambda e: e.role != "base_weight"):  # vocabulary first
        info = adapter.tensors[entry.key]
        on_parameter = entry.role in LORA_ROLES and entry.parameter  # rank_pattern: its path
        rank = config.rank_for(entry.parameter if on_parameter else entry.module)
        shape = expected_shape(modules, entry, rank)
        if tuple(info.shape) != shape:
            experts = _experts(modules, entry)
            got = tuple(info.shape)
            raise AdapterFileError(
                _expert_shape_message(source, entry, got, shape, rank, experts)
                if experts
                else _shape_message(source, entry, got, shape, rank)
            )
        _check_dtype(source, entry, info.dtype, modules)


def _check_dtype(source, entry: FileTensor, dtype: str, modules: dict[str, nn.Module]) -> None:
    """LoRA factors, biases and base weights must be floating point; a saved module's tensor
    the same kind (floating point or not) as the model's."""
    floating = TORCH_DTYPES[dtype].is_floating_point
    if entry.role == "saved":
        wanted = modules[entry.module].state_dict()[entry.parameter].is_floating_point()
    else:
        wanted = True
    if floating != wanted:
        raise AdapterFileError(
            f"adapter {source}: tensor {entry.key} has dtype {dtype}, expected a "
            f"{'floating-point' if wanted else 'non-floating-point'} dtype. The file is broken; "
            "re-save the adapter."
        )


def _experts(modules: dict[str, nn.Module], entry: FileTensor) -> int:
    """E of the 3-D expert parameter a LoRA factor ``entry`` belongs to; 0 for anything else."""
    if entry.role not in LORA_ROLES or not entry.parameter:
        return 0
    owner, _, name = entry.parameter.rpartition(".")
    return parameter_layout(getattr(modules[owner], name), False)[0]


def _expert_shape_message(
    source, entry: FileTensor, got: tuple, want: tuple, rank: int, experts: int
) -> str:
    """The message for a LoRA factor of a 3-D expert parameter of ``experts`` experts: its
    rank axis holds E x r rows (A (E r, k)) or columns (B (d, E r)), not the rank itself."""
    message = f"adapter {source}: tensor {entry.key} has shape {list(got)}, expected {list(want)}"
    axis = 0 if entry.role == "lora_A" else 1
    count, what = got[axis] if len(got) == 2 else None, ("rows" if axis == 0 else "columns")
    where = (
        f"for the expert parameter {entry.parameter} ({experts} experts on this model) the "
        f"{entry.role} {what} are E x r = {experts} x {rank} = {want[axis]}"
    )
    if count is None or got[1 - axis] != want[1 - axis] or count % experts:
        return (
            f"{message}: {where}. The tensor does not fit that layout: the adapter was trained "
            "on a base with another number of experts or other dimensions; load it onto that base."
        )
    other_base = (
        f", or it was trained on a base with {count // rank} experts (at rank {rank})"
        if count % rank == 0
        else ""
    )
    return (
        f"{message}: {where}, but the tensor has {count} = {experts} x {count // experts}: rank "
        f"{count // experts} where the config (r / rank_pattern in adapter_config.json) gives "
        f"{rank}. Either the config and the weights disagree (fix r / rank_pattern for "
        f"{entry.parameter}, or re-save the adapter){other_base}."
    )


def _shape_message(source, entry: FileTensor, got: tuple, want: tuple, rank: int) -> str:
    message = f"adapter {source}: tensor {entry.key} has shape {list(got)}, expected {list(want)}"
    if entry.role in ("lora_A", "lora_B") and len(got) == 2 == len(want):
        rank_axis = 0 if entry.role == "lora_A" else 1
        if got[1 - rank_axis] == want[1 - rank_axis]:
            return (
                f"{message}: the config gives rank r={rank} for {entry.module} (r / rank_pattern "
                f"in adapter_config.json) but the tensor has rank {got[rank_axis]}. The config "
                "and the weights disagree; fix adapter_config.json or re-save the adapter."
            )
    if entry.role == "base_weight" and len(got) == len(want) and got[1:] == want[1:]:
        return (
            f"{message}: the adapter was saved with a resized vocabulary of {got[0]} tokens; "
            f"call model.resize_token_embeddings({got[0]}) before loading it."
        )
    if entry.role == "magnitude" and len(got) != 1:
        return (
            f"{message}: a DoRA magnitude vector must be 1-D, of shape [d] ([{want[0]}] here, "
            f"one value per output feature of {entry.module}), but this tensor is "
            f"{len(got)}-D. The file is malformed; re-save the adapter with peft or lorakit."
        )
    if len(got) == 2 == len(want) and got == want[::-1] and got != want:
        return (
            f"{message}: the tensor is transposed (saved in another layout?). Re-save the "
            "adapter with peft or lorakit."
        )
    return f"{message} on this model: it was trained on a base with other dimensions."


def check_targets_take(
    model: nn.Module, to_load: LoadTargets, current: dict[str, nn.Module], adapter_name: str
) -> None:
    """``AdapterFileError`` naming the file, the module and its type (before anything changes,
    and before the tensor checks, which assume layer kinds lorakit adapts) when a target cannot
    take the file's adapter: inject's own checks (``check_adapter_fits``), e.g. a PEFT adapter
    on an ``nn.Conv2d`` (no LoRA layer for it in lorakit) or DoRA on an embedding (lorakit
    implements DoRA on linear layers only). Saved modules and token rows are checked later, by
    the injection itself, and so are inject's warnings (``warn=False``: not given twice, and no
    change to the process's warning filters, which other threads share)."""
    targets = {name: current[name] for name in to_load.targets}
    config, parameters = to_load.config, to_load.parameter_targets
    _refuse_peft_only_layers(to_load, targets)
    try:
        check_adapter_fits(
            model, config, adapter_name, None, targets, [], [], parameters, warn=False
        )
    except (TypeError, ValueError) as error:
        raise AdapterFileError(
            f"adapter {to_load.source} cannot be loaded into this model: {error}"
        ) from None


def _refuse_peft_only_layers(to_load: LoadTargets, targets: dict[str, nn.Module]) -> None:
    """``AdapterFileError`` for the first target on which the file has DoRA or ``lora_bias``
    and lorakit's layer for it has not (an embedding: PEFT's DoRA embedding; a quantized base),
    saying what the user can do with the FILE (inject's advice, to change target_modules or the
    config, does not apply to a file)."""
    config = to_load.config
    for name, module in targets.items():
        try:
            layer_class = layer_class_for(module, name)
        except (TypeError, ValueError):
            continue  # (check_adapter_fits names it)
        if config.use_dora and not layer_class.supports_dora:
            feature = "DoRA (use_dora=true)"
        elif config.lora_bias and not layer_class.supports_lora_bias:
            feature = "a bias on B (lora_bias=true)"
        else:
            continue
        raise AdapterFileError(_peft_only_message(to_load.source, feature, module, name))


def _peft_only_message(source: object, feature: str, module: nn.Module, name: str) -> str:
    """``adapter <source> uses <feature> on ...``: which module, why lorakit cannot load it
    there, and what to do with the file instead."""
    fmt = quantized_format(module)
    if fmt is not None:
        return (
            f"adapter {source} uses {feature} on module {name!r}, which is quantized here "
            f"({fmt}); lorakit does not implement that on a quantized base (docs/quantized.md). "
            "Load it onto the float model, or load it with peft."
        )
    kind = type(original_module(module))
    noun = "embedding" if issubclass(kind, nn.Embedding) else kind.__name__
    return (
        f"adapter {source} uses {feature} on the {noun} {name!r} (PEFT implements it there, "
        "lorakit does not), so lorakit cannot load it. Load it with peft, or merge it with peft "
        "(merge_and_unload) and use the merged model."
    )
