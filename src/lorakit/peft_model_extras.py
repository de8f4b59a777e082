"""The parts of lorakit's ``PeftModel`` that are about its surroundings, not about adapters:
the methods that read and write adapter files (``PeftFilesMixin``: ``from_pretrained``,
``load_adapter``, ``save_pretrained``, and ``push_to_hub``, which uploads the adapter files
only). The class each wrapped model gets (``PeftModelFor<ModelClass>``, so tools that read
``forward``'s signature see the transformers model's arguments) is ``peft_wrapper_class``'s;
``remade_wrapper`` stays importable here, where pickles written before that split name it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.inject import freeze_adapter
from lorakit.peft_reload import reload_adapter
from lorakit.peft_wrapper_class import remade_wrapper, wrapper_class
from lorakit.state import adapter_name_list, adapter_tensors, state_of

if TYPE_CHECKING:
    from lorakit.peft_compat import PeftModel

__all__ = [
    "PeftFilesMixin",
    "base_dtype",
    "record_task_heads",
    "remade_wrapper",
    "wrapper_class",
]


class PeftFilesMixin:
    """``PeftModel``'s methods that read and write adapter files (PEFT's names and arguments);
    ``self.model`` is the transformers model that holds the adapters."""

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        allow_base_mismatch: bool = False,
        subfolder: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        torch_device: str | torch.device | None = None,
    ) -> PeftModel:
        """Load the adapter saved in directory ``model_id`` (or ``model_id/subfolder``) onto
        ``model`` and wrap it. As in PEFT, ``adapter_name`` only names it: an adapter that
        ``save_pretrained`` wrote in ``model_id/<name>`` loads with ``subfolder=<name>``.

        ``is_trainable=False`` (PEFT's default) loads it frozen, for inference, and puts the
        whole model in eval mode (dropout off), as PEFT does. ``is_trainable=True`` leaves the
        model's mode as it was; the new LoRA layers take the mode of the modules they wrap.
        Frozen means frozen: biases trained by a ``bias="all"`` / ``"lora_only"`` adapter too
        (PEFT leaves them trainable).

        ``autocast_adapter_dtype``, ``low_cpu_mem_usage`` and ``torch_device``: as in
        ``load_adapter``.
        """
        wrapper = cls(model)
        wrapper.load_adapter(
            model_id,
            adapter_name,
            is_trainable,
            torch_device,
            autocast_adapter_dtype,
            allow_base_mismatch=allow_base_mismatch,
            subfolder=subfolder,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        wrapper.set_adapter(adapter_name, inference_mode=not is_trainable)
        return wrapper

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        *,
        allow_base_mismatch: bool = False,
        subfolder: str | None = None,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Load another adapter from directory ``model_id`` (or ``model_id/subfolder``, PEFT's
        argument); the active adapters stay as they were (unless the model had none). As in
        PEFT: ``is_trainable=True`` makes the new adapter's tensors trainable (LoRA factors,
        DoRA magnitudes, ``modules_to_save`` copies, trainable-token rows) beside the active
        adapters', until the next ``set_adapter`` freezes every adapter it does not activate;
        ``is_trainable=False`` freezes them and puts the whole model in eval mode.
        ``peft_config[adapter_name].inference_mode`` is ``not is_trainable``, as in PEFT.

        PEFT's options: ``autocast_adapter_dtype=False`` keeps the adapter in the base dtype
        (default: float32 on a float16/bfloat16 base); ``torch_device`` is where PEFT reads the
        file: the adapter goes to the device of the layers it adapts in both (only checked here);
        ``low_cpu_mem_usage`` is accepted and has no effect (a load never initialises the
        adapter tensors it then overwrites).

        An ``adapter_name`` the model holds already is reloaded, as in PEFT: the file's tensors
        are copied into that adapter (``reload_adapter``; a file that does not fit it is
        refused, saying why); its config, ``requires_grad`` flags and active state stay, and
        ``is_trainable=False`` only puts the model in eval mode."""
        from lorakit.io import load_adapter

        if torch_device is not None:
            torch.device(torch_device)  # a malformed device name is an error, as in PEFT
        if adapter_name in self.peft_config:  # PEFT: the file's tensors into that adapter
            reload_adapter(self.model, model_id, adapter_name, allow_base_mismatch, subfolder)
            if not is_trainable:
                self.eval()
            return
        load_adapter(
            self.model,
            model_id,
            adapter_name,
            allow_base_mismatch=allow_base_mismatch,
            subfolder=subfolder,
            adapter_dtype=None if autocast_adapter_dtype else base_dtype(self.model),
        )
        record_task_heads(self.model, adapter_name)
        if is_trainable:
            train_adapter(self.model, adapter_name)
        else:
            freeze_adapter(self.model, adapter_name)
            self.eval()
        self.peft_config[adapter_name].inference_mode = not is_trainable

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str | None = None,
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
    ) -> None:
        """Save adapters in PEFT's format: ``default`` in ``save_directory``, any other adapter
        in ``save_directory/<name>`` (PEFT's layout). Only the main process writes.
        ``path_initial_model_for_weight_conversion``: the PiSSA/OLoRA adapter as saved before
        training; each adapter is saved converted into a plain LoRA for the original base
        (``save_adapter(..., initial_adapter=...)``). Unlike peft, that directory is only read."""
        from lorakit.io import save_adapter

        if not isinstance(safe_serialization, bool):
            raise TypeError(
                f"save_pretrained's second argument is safe_serialization (a bool), as in PEFT; "
                f"got {safe_serialization!r}: pass the adapters as selected_adapters=..."
            )
        if not safe_serialization:
            raise ValueError(
                "safe_serialization=False asks for a pickle file (adapter_model.bin); lorakit "
                "writes safetensors only, which peft, vLLM and LoRAX all read. Drop the argument."
            )
        names = _selected_names(selected_adapters, list(self.peft_config))
        if not is_main_process:
            return
        for adapter_name in names:
            save_adapter(
                self.model,
                save_directory,
                adapter_name,
                save_embedding_layers=save_embedding_layers,
                initial_adapter=path_initial_model_for_weight_conversion,
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        *,
        selected_adapters: Sequence[str] | None = None,
    ) -> Any:
        """Upload the adapters (what ``save_pretrained`` writes: ``adapter_config.json`` and
        ``adapter_model.safetensors``, others in ``<name>/``), never the base model, to the
        Hugging Face Hub repository ``repo_id`` (created if missing) as one commit; returns
        ``huggingface_hub``'s ``CommitInfo``. Arguments as transformers' / PEFT's."""
        from huggingface_hub import HfApi

        api = HfApi(token=token if isinstance(token, str) else None)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory, selected_adapters=selected_adapters)
            return api.upload_folder(
                repo_id=getattr(repo, "repo_id", repo_id),
                folder_path=os.fspath(directory),
                repo_type="model",
                commit_message=commit_message or "Upload LoRA adapter",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


def _selected_names(selected: str | Sequence[str] | None, known: list[str]) -> tuple[str, ...]:
    """The adapters ``save_pretrained`` writes: ``selected`` (one name given as a string is that
    name; an empty list: none, as in PEFT), or every adapter when it is None; a name the model
    lacks is a ``ValueError`` (as in PEFT) raised before anything is written."""
    names = tuple(known) if selected is None else adapter_name_list(selected)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"selected_adapters={selected!r} names adapter(s) {unknown} that this model does "
            f"not have; it has {known}. Nothing was written."
        )
    return names


def train_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make adapter ``adapter_name``'s tensors (``adapter_tensors``) trainable, as PEFT's
    ``load_adapter(..., is_trainable=True)`` does, whether or not it is active; the active
    adapters stay trainable. The tensors join what the next ``set_active`` / ``set_adapter``
    freezes first, so activating other adapters freezes them, as PEFT's ``set_adapter``
    freezes every adapter it does not activate."""
    state = state_of(model)
    recorded = {id(p) for p in state.trainable}
    for parameter in adapter_tensors(model, [adapter_name]):
        parameter.requires_grad_(True)
        if id(parameter) not in recorded:
            state.trainable.append(parameter)


def record_task_heads(model: nn.Module, adapter_name: str) -> None:
    """Make ``peft_config[adapter_name].modules_to_save`` read as PEFT's task models make it:
    with the heads the task type trains and saves (``targets.saved_module_entries``:
    ``["classifier", "score"]`` for ``SEQ_CLS`` / ``TOKEN_CLS``, ``["qa_outputs"]`` for
    ``QUESTION_ANS``, after the config's own entries). The recorded config becomes a copy with
    that list (the caller's config is left as it was); what is trained and saved does not
    change, since inject and save read the same entries."""
    from lorakit.state import adapter_configs
    from lorakit.targets import saved_module_entries

    configs = adapter_configs(model)
    config = configs[adapter_name]
    entries = saved_module_entries(config)
    if entries and entries != (config.modules_to_save or []):
        configs[adapter_name] = config.replace(modules_to_save=entries)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first parameter: adapters take it with
    ``autocast_adapter_dtype=False`` (PEFT's rule)."""
    return next(model.parameters()).dtype
