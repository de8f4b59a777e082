"""PEFT's tensor key names, in one place.

A file key is ``base_model.model.`` + the module path in the ORIGINAL model + a suffix; the
adapter name never appears in a file (PEFT removes it):

| what | file key | shape |
|---|---|---|
| Linear / Conv1D A, B | ``<path>.lora_A.weight``, ``<path>.lora_B.weight`` | (r, k), (d, r) |
| a bare parameter's A, B (``target_parameters``) | the same, ``<path>`` the layer's (``.base_layer`` per nesting) | (E r, k), (d, E r) |
| trainable tokens (``trainable_token_indices``) | ``<path>.token_adapter.trainable_tokens_delta`` | (n, dim) |
| DoRA magnitude (``use_dora``) | ``<path>.lora_magnitude_vector`` (no ``.weight``) | (d,) |
| bias on B (``lora_bias``) | ``<path>.lora_B.bias`` | (d,) |
| Embedding A, B | ``<path>.lora_embedding_A``, ``<path>.lora_embedding_B`` | (r, num), (dim, r) |
| bias of an adapted layer (``bias`` != "none") | ``<path>.base_layer.bias`` | (d,) |
| base weight of an adapted embedding (resized vocab) | ``<path>.base_layer.weight`` | base |
| base weight of an embedding with trainable tokens (resized vocab) | ``<path>.token_adapter.base_layer.weight`` | base |
| base weight of a module ANOTHER adapter of the saved model wraps (``stray_weights.stray_base_layer_module``) | ``<path>.base_layer.weight`` | base |
| any other parameter (biases, ``modules_to_save``, resized embeddings) | ``<path>.<param>`` | full |

In the model (``model.state_dict()``) the same tensors carry the adapter name:
``<path>.lora_A.<adapter>.weight``, ``<path>.lora_magnitude_vector.<adapter>.weight``,
``<path>.lora_embedding_A.<adapter>``,
``<path>.modules_to_save.<adapter>.<param>``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSave, linear_shape
from lorakit.layers.parameter import parameter_layout
from lorakit.layers.tokens import DELTA_KEY
from lorakit.targets import model_modules, original_module, saved_module_matches

__all__ = [
    "PREFIX",
    "FileTensor",
    "adapted_base_key",
    "adapter_file_tensors",
    "base_weight_key",
    "base_weight_module",
    "embedding_module_names",
    "expected_shape",
    "is_magnitude_key",
    "is_token_rows_key",
    "key_names_module",
    "lora_bias_key",
    "lora_key_pairs",
    "lora_keys",
    "magnitude_key",
    "model_tensor",
    "module_path",
    "parse_lora_key",
    "plain_key",
    "saved_module_alias_keys",
    "unmerged_base_tensor",
]

PREFIX = "base_model.model."


def lora_keys(module_path: str, is_embedding: bool) -> tuple[str, str]:
    """File keys of A and B for the LoRA layer at ``module_path`` (original module name)."""
    if is_embedding:
        return (
            f"{PREFIX}{module_path}.lora_embedding_A",
            f"{PREFIX}{module_path}.lora_embedding_B",
        )
    return f"{PREFIX}{module_path}.lora_A.weight", f"{PREFIX}{module_path}.lora_B.weight"


def magnitude_key(module_path: str) -> str:
    """File key of the DoRA magnitude vector of the LoRA layer at ``module_path``."""
    return f"{PREFIX}{module_path}.lora_magnitude_vector"


def lora_bias_key(module_path: str) -> str:
    """File key of the bias on B (``lora_bias=True``) of the LoRA layer at ``module_path``."""
    return f"{PREFIX}{module_path}.lora_B.bias"


def is_magnitude_key(file_key: str) -> bool:
    """True for the file key of a DoRA magnitude vector."""
    return file_key.endswith(".lora_magnitude_vector")


def adapted_base_key(module_path: str, parameter: str) -> str:
    """File key of a parameter of an adapted layer's base module, e.g. ``<path>.base_layer.bias``."""
    return f"{PREFIX}{module_path}.base_layer.{parameter}"


def base_weight_key(module_path: str, adapted: bool, token_rows: bool = False) -> str:
    """File key of an embedding's full base weight (saved for a resized vocabulary): PEFT's
    ``<path>.base_layer.weight`` for a LoRA layer (``adapted``), ``<path>.token_adapter.
    base_layer.weight`` for an embedding with trainable tokens (``token_rows``), else
    ``<path>.weight``."""
    if token_rows:
        return plain_key(f"{module_path}.token_adapter.base_layer.weight")
    return (
        adapted_base_key(module_path, "weight") if adapted else plain_key(f"{module_path}.weight")
    )


def base_weight_module(
    file_key: str, adapted: Collection[str], modules_to_save: Sequence[str] = ()
) -> str | None:
    """The module whose full frozen base weight ``file_key`` is (role "base_weight": PEFT's
    ``save_embedding_layers``), from the key alone (no model), else None. ``adapted``: the
    modules with LoRA factors in the same file; ``modules_to_save``: the config's entries.

    ``<path>.base_layer.weight`` with ``<path>`` adapted, ``<path>.token_adapter.base_layer.
    weight``, or ``<path>.weight`` of a module neither adapted nor inside a module that
    ``modules_to_save`` picks (those tensors are trained copies, not base weights)."""
    if not file_key.endswith(".weight") or parse_lora_key(file_key) is not None:
        return None
    path = module_path(file_key.removesuffix(".weight"))
    if path.endswith(".token_adapter.base_layer"):
        return path.removesuffix(".token_adapter.base_layer")
    if path.endswith(".base_layer"):
        path = path.removesuffix(".base_layer")
        return path if path in adapted else None
    parts = path.split(".")
    enclosing = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    if path in adapted or any(saved_module_matches(list(modules_to_save), m) for m in enclosing):
        return None
    return path


def is_token_rows_key(file_key: str) -> bool:
    """True for the file key of trained embedding rows (``trainable_token_indices``)."""
    return file_key.endswith("." + DELTA_KEY)


def embedding_module_names(
    model: nn.Module, modules: dict[str, nn.Module] | None = None
) -> list[str]:
    """Original names of the model's input and output embeddings (``get_input_embeddings``,
    ``get_output_embeddings``), the modules whose base weight a resized vocabulary changes.
    ``modules``: ``dict(model_modules(model))`` when the caller has it."""
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:  # under lorakit's wrappers (LoRA layers, token rows, copies)
            wanted.append(original_module(module))
    ids = {id(module) for module in wanted}
    named = model_modules(model) if modules is None else modules.items()
    return [name for name, module in named if id(module) in ids]


def plain_key(parameter_path: str) -> str:
    """File key of a parameter outside any LoRA layer, e.g. ``classifier.weight``."""
    return f"{PREFIX}{parameter_path}"


def saved_module_alias_keys(module_path: str, parameter: str) -> tuple[str, str]:
    """Keys peft also writes for a ``modules_to_save`` module when ``bias="all"``:
    ``<path>.modules_to_save.<param>`` (the trained copy) and ``<path>.original_module.<param>``
    (the frozen original). lorakit never writes them and ignores them on load."""
    return (
        f"{PREFIX}{module_path}.modules_to_save.{parameter}",
        f"{PREFIX}{module_path}.original_module.{parameter}",
    )


_LINEAR_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
_EMBEDDING_SUFFIXES = {".lora_embedding_A": "lora_A", ".lora_embedding_B": "lora_B"}


def parse_lora_key(file_key: str, *, embeddings: bool = True) -> tuple[str, str] | None:
    """``(module path, "lora_A" | "lora_B")`` for a LoRA factor's file key, else None.

    ``base_model.model.<path>.lora_A.weight`` -> ``(<path>, "lora_A")`` (the prefix is optional);
    ``embeddings=False`` recognises the factors of linear layers only (``.lora_A.weight`` /
    ``.lora_B.weight``), not those of embeddings (``.lora_embedding_A`` / ``_B``)."""
    suffixes = {**_LINEAR_SUFFIXES, **_EMBEDDING_SUFFIXES} if embeddings else _LINEAR_SUFFIXES
    for suffix, role in suffixes.items():
        if file_key.endswith(suffix):
            return module_path(file_key.removesuffix(suffix)), role
    return None


def lora_key_pairs(
    file_keys: Iterable[str], *, embeddings: bool = True
) -> dict[str, dict[str, str]]:
    """``{module path: {"lora_A": key of A, "lora_B": key of B}}`` for the LoRA factor keys
    among ``file_keys`` (``parse_lora_key``; other keys are left out). A module may lack one of
    its two factors: the caller says what that means."""
    pairs: dict[str, dict[str, str]] = {}
    for key in file_keys:
        parsed = parse_lora_key(key, embeddings=embeddings)
        if parsed is not None:
            pairs.setdefault(parsed[0], {})[parsed[1]] = key
    return pairs


def key_names_module(file_key: str, module_name: str) -> bool:
    """Whether ``module_name`` is a whole dotted part of ``file_key``'s path (``score`` in
    ``base_model.model.score.weight``, not in ``base_model.model.scores.weight``)."""
    return f".{module_name}." in "." + file_key


def module_path(file_key: str) -> str:
    """The model path of a file key without the ``base_model.model.`` prefix."""
    return file_key.removeprefix(PREFIX)


# --------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class FileTensor:
    """One tensor of an adapter file: its file key, the ORIGINAL module path it belongs to and
    its role: "lora_A" / "lora_B" (for a bare parameter, ``parameter`` is its path and
    ``module`` the path of its LoRA layer), "magnitude" (DoRA's m), "lora_bias" (the bias on B),
    "tokens" (trained embedding rows, ``parameter`` is their count),
    "bias" (a base bias trained by
    ``bias`` mode), "saved" (a ``modules_to_save`` tensor; ``parameter`` is its state-dict key)
    or "base_weight" (the base weight of an input/output embedding, only when the vocabulary was
    resized)."""

    key: str
    module: str
    role: str
    parameter: str = ""


def adapter_file_tensors(
    model: nn.Module,
    bias: str,
    lora_modules: Sequence[str],
    saved_modules: Sequence[str],
    embedding_modules: Sequence[str] = (),
    modules: dict[str, nn.Module] | None = None,
    use_dora: bool = False,
    lora_bias: bool = False,
    token_modules: Mapping[str, int] | None = None,
    parameter_layers: Mapping[str, str] | None = None,
) -> list[FileTensor]:
    """Every tensor an adapter file holds, in PEFT's names.

    ``lora_modules``: modules with LoRA tensors; ``saved_modules``: modules saved in full;
    ``embedding_modules``: embeddings whose base weight is saved (resized vocabulary).
    Works before injection (on the plain model) and after (names are original names).
    ``modules``: ``dict(model_modules(model))`` when the caller has it. ``use_dora``: each
    LoRA module also has a DoRA magnitude vector; ``lora_bias``: a bias on B;
    ``token_modules``: ``{embedding: number of trained rows}`` (``trainable_token_indices``);
    ``parameter_layers``: ``{LoRA layer path: parameter path}`` (``target_parameters``).
    """
    modules = dict(model_modules(model)) if modules is None else modules
    lora_set, saved_prefixes = set(lora_modules), tuple(f"{m}." for m in saved_modules)
    tensors: list[FileTensor] = []
    for name in lora_modules:
        key_A, key_B = lora_keys(name, isinstance(modules[name], nn.Embedding))
        tensors += [FileTensor(key_A, name, "lora_A"), FileTensor(key_B, name, "lora_B")]
        if use_dora:
            tensors.append(FileTensor(magnitude_key(name), name, "magnitude"))
        if lora_bias:
            tensors.append(FileTensor(lora_bias_key(name), name, "lora_bias"))
    for layer_path, parameter_path in (parameter_layers or {}).items():
        key_A, key_B = lora_keys(layer_path, False)
        tensors += [
            FileTensor(key_A, layer_path, "lora_A", parameter_path),
            FileTensor(key_B, layer_path, "lora_B", parameter_path),
        ]
    for name, module in modules.items():
        if bias == "none" or name in saved_modules or name.startswith(saved_prefixes):
            continue
        if not isinstance(getattr(module, "bias", None), nn.Parameter):
            continue
        if name in lora_set:
            tensors.append(FileTensor(adapted_base_key(name, "bias"), name, "bias", "bias"))
        elif bias == "all":
            tensors.append(FileTensor(plain_key(f"{name}.bias"), name, "bias", "bias"))
    for name in saved_modules:
        for parameter in modules[name].state_dict():
            tensors.append(FileTensor(plain_key(f"{name}.{parameter}"), name, "saved", parameter))
    for name, count in (token_modules or {}).items():
        tensors.append(FileTensor(plain_key(f"{name}.{DELTA_KEY}"), name, "tokens", str(count)))
    for name in embedding_modules:
        if name in saved_modules or name.startswith(saved_prefixes):
            continue  # its key is the saved copy's (the trained weight), not the base weight's
        key = base_weight_key(name, name in lora_set, name in (token_modules or {}))
        tensors.append(FileTensor(key, name, "base_weight", "weight"))
    return tensors


def expected_shape(modules: dict[str, nn.Module], entry: FileTensor, rank: int) -> tuple[int, ...]:
    """The shape ``entry`` must have; ``modules`` is ``dict(model_modules(model))`` (original
    modules, before or after injection) and ``rank`` the adapter's rank for ``entry.module``."""
    if entry.role in ("lora_A", "lora_B") and entry.parameter:  # a bare parameter
        owner, _, name = entry.parameter.rpartition(".")
        transposed = bool(getattr(modules[owner], "is_transposed", False))
        experts, out_features, in_features = parameter_layout(
            getattr(modules[owner], name), transposed
        )
        rows = rank * max(1, experts)
        return (rows, in_features) if entry.role == "lora_A" else (out_features, rows)
    module = modules[entry.module]
    if entry.role in ("lora_A", "lora_B"):
        if isinstance(module, nn.Embedding):
            num, dim = module.num_embeddings, module.embedding_dim
            return (rank, num) if entry.role == "lora_A" else (dim, rank)
        out_features, in_features = linear_shape(module)
        return (rank, in_features) if entry.role == "lora_A" else (out_features, rank)
    if entry.role == "saved":
        return tuple(module.state_dict()[entry.parameter].shape)
    if entry.role in ("magnitude", "lora_bias"):
        return (linear_shape(module)[0],)
    if entry.role == "tokens":
        return (int(entry.parameter), module.embedding_dim)
    return tuple(getattr(module, entry.parameter).shape)


def model_tensor(model: nn.Module, entry: FileTensor, adapter_name: str) -> torch.Tensor:
    """The model's tensor behind ``entry`` for adapter ``adapter_name`` (after injection)."""
    module = model.get_submodule(entry.module)
    if entry.role in ("lora_A", "lora_B"):
        if isinstance(module, LoraEmbedding):
            table = module.lora_embedding_A if entry.role == "lora_A" else module.lora_embedding_B
            return table[adapter_name]
        return getattr(module, entry.role)[adapter_name].weight
    if entry.role == "saved":
        return module.modules_to_save[adapter_name].state_dict(keep_vars=True)[entry.parameter]
    if entry.role == "magnitude":
        return module.lora_magnitude_vector[adapter_name].weight
    if entry.role == "lora_bias":
        return module.lora_B[adapter_name].bias
    if entry.role == "tokens":
        return module.modules_to_save[adapter_name].values
    return unmerged_base_tensor(module, entry.parameter)


def unmerged_base_tensor(module: nn.Module, parameter: str) -> torch.Tensor:
    """The base tensor ``parameter`` ("weight", "bias") of ``module`` (a LoRA layer, nested ones
    included, a saved-module wrapper or a plain module) WITHOUT any merged adapter: the original
    Parameter a merged LoRA layer keeps aside (``original_weight``, ``original_bias``), which is
    the live one when nothing is merged. A file therefore holds the same base tensors whether
    the model was merged or not, and a load writes into the tensor merging starts from."""
    while isinstance(module, LoraLayer):
        layer_parameter = getattr(module, "parameter_name", "weight")  # LoraParameter: its own
        if parameter == layer_parameter and module.original_weight is not None:
            return module.original_weight
        if parameter == "bias" and hasattr(module, "original_bias"):
            return module.original_bias  # a bias on B merged into it: the one kept aside
        module = module.base_layer
    if isinstance(module, ModulesToSave):
        module = module.original_module
    return getattr(module, parameter)
