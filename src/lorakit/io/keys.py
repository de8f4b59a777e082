"""PEFT's tensor key names, in one place.

A file key is ``base_model.model.`` + the module path in the ORIGINAL model + a suffix; the
adapter name never appears in a file (PEFT removes it):

| what | file key | shape |
|---|---|---|
| Linear / Conv1D A, B | ``<path>.lora_A.weight``, ``<path>.lora_B.weight`` | (r, k), (d, r) |
| a bare parameter's A, B (``target_parameters``) | the same, ``<path>`` the layer's (``.base_layer`` per nesting) | (E r, k), (d, E r) |
| trainable tokens (``trainable_token_indices``) | ``<path>.token_adapter.trainable_tokens_delta`` | (n, dim) |
| DoRA magnitude (``use_dora``) | written ``<path>.lora_magnitude_vector.weight`` (``written_key``); PEFT's own spelling ``<path>.lora_magnitude_vector`` is read as well; in memory (``canonical_keys``) PEFT's | (d,) |
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

Why a DoRA magnitude is written with ``.weight``: peft (0.12 on, where the magnitude became a
module) loads both spellings (its ``set_peft_model_state_dict`` appends ``.weight`` to PEFT's),
but transformers 5's ``load_adapter`` renames keys by pattern (``lora_*`` -> ``lora_*.<adapter>``)
without that step, so PEFT's spelling lands on no parameter and the magnitudes keep their
initial values; ``.weight`` loads right in both. peft < 0.12 (a ``ParameterDict``) reads only
PEFT's spelling.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TypeVar

from torch import nn

from lorakit.layers.tokens import DELTA_KEY
from lorakit.targets import model_modules, original_module, saved_module_matches

__all__ = [
    "PREFIX",
    "adapted_base_key",
    "base_weight_key",
    "base_weight_module",
    "canonical_key",
    "canonical_keys",
    "embedding_module_names",
    "is_magnitude_key",
    "is_saved_module_alias",
    "is_token_rows_key",
    "key_names_module",
    "lora_bias_key",
    "lora_key_pairs",
    "lora_keys",
    "magnitude_key",
    "module_path",
    "parse_lora_key",
    "plain_key",
    "saved_module_alias_keys",
    "written_key",
    "written_keys",
]

PREFIX = "base_model.model."
_Value = TypeVar("_Value")


def lora_keys(module_path: str, is_embedding: bool) -> tuple[str, str]:
    """File keys of A and B for the LoRA layer at ``module_path`` (original module name)."""
    if is_embedding:
        return (
            f"{PREFIX}{module_path}.lora_embedding_A",
            f"{PREFIX}{module_path}.lora_embedding_B",
        )
    return f"{PREFIX}{module_path}.lora_A.weight", f"{PREFIX}{module_path}.lora_B.weight"


def magnitude_key(module_path: str) -> str:
    """Key of the DoRA magnitude vector of the LoRA layer at ``module_path``, in PEFT's spelling
    (``canonical_key``); a file gets it as ``written_key`` spells it."""
    return f"{PREFIX}{module_path}.lora_magnitude_vector"


def lora_bias_key(module_path: str) -> str:
    """File key of the bias on B (``lora_bias=True``) of the LoRA layer at ``module_path``."""
    return f"{PREFIX}{module_path}.lora_B.bias"


MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
_MAGNITUDE_WEIGHT_SUFFIX = MAGNITUDE_SUFFIX + ".weight"  # Diffusers' / ai-toolkit's spelling


def is_magnitude_key(file_key: str) -> bool:
    """True for the file key of a DoRA magnitude vector, in either spelling
    (``<path>.lora_magnitude_vector``, PEFT's, or ``<path>.lora_magnitude_vector.weight``)."""
    return file_key.endswith((MAGNITUDE_SUFFIX, _MAGNITUDE_WEIGHT_SUFFIX))


def canonical_key(file_key: str) -> str:
    """``file_key`` as PEFT writes it: ``<path>.lora_magnitude_vector.weight`` (lorakit's
    ``written_key``, which peft >= 0.12 loads as well) becomes ``<path>.lora_magnitude_vector``;
    any other key is kept."""
    if file_key.endswith(_MAGNITUDE_WEIGHT_SUFFIX):
        return file_key.removesuffix(".weight")
    return file_key


def written_key(key: str) -> str:
    """``key`` as an adapter file holds it: a DoRA magnitude ``<path>.lora_magnitude_vector``
    becomes ``<path>.lora_magnitude_vector.weight`` (the spelling transformers 5's
    ``load_adapter`` and peft >= 0.12 load right, see the module docstring); any other key is
    kept. ``canonical_key`` undoes it."""
    return key + ".weight" if key.endswith(MAGNITUDE_SUFFIX) else key


def written_keys(tensors: Mapping[str, _Value]) -> dict[str, _Value]:
    """``tensors`` with each key made ``written_key`` (order kept)."""
    return {written_key(key): value for key, value in tensors.items()}


def canonical_keys(tensors: Mapping[str, _Value]) -> dict[str, _Value]:
    """``tensors`` with each key made ``canonical_key`` (order kept); ``ValueError`` naming
    both keys when two spellings of one magnitude are present (which one holds it?)."""
    renamed: dict[str, _Value] = {}
    for key, value in tensors.items():
        canonical = canonical_key(key)
        if canonical in renamed:
            raise ValueError(
                f"tensors {canonical} and {canonical}.weight are both present: two spellings "
                "of one DoRA magnitude vector. Keep one of them (re-save the adapter)."
            )
        renamed[canonical] = value
    return renamed


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
    if is_magnitude_key(file_key):  # (``<path>.lora_magnitude_vector.weight``)
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


def is_saved_module_alias(file_key: str, file_keys: Collection[str]) -> bool:
    """Whether ``file_key`` is one of the duplicates of a saved module's tensor that peft
    writes (``saved_module_alias_keys``: ``<path>.modules_to_save.<param>`` or
    ``<path>.original_module.<param>``) beside the tensor itself, ``<path>.<param>``, which
    ``file_keys`` holds too: loading (lorakit's, peft's) reads the latter and ignores it."""
    for part in (".modules_to_save.", ".original_module."):
        path, found, parameter = file_key.rpartition(part)
        if found and f"{path}.{parameter}" in file_keys:
            return True
    return False


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
