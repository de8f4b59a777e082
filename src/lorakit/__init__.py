"""lorakit: LoRA adapters for PyTorch / transformers models.

    h = W0 x + (lora_alpha / r) * B A x      (A: r x k, B: d x r, W0 frozen)

Quick start::

    import lorakit
    config = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject(model, config)          # wraps the targets in place, freezes the rest
    lorakit.print_trainable_parameters(model)
    ...train...
    lorakit.save_adapter(model, "my-adapter")     # PEFT's format: peft, transformers, vLLM read it
    model = lorakit.merge_and_unload(model)        # plain model, zero inference overhead
"""

from typing import TYPE_CHECKING

from lorakit.lazy_exports import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers; at run time ``__getattr__`` loads them
    from lorakit.accounting import ParameterCount, count_parameters, print_trainable_parameters
    from lorakit.adapter_choice import disabled, use_adapters
    from lorakit.combining import combine
    from lorakit.config import LoraConfig, TaskType
    from lorakit.errors import AdapterFileError, BaseModelMismatchError, UserError
    from lorakit.eva import initialize_lora_eva_weights
    from lorakit.init_methods import EvaConfig, LoftQConfig
    from lorakit.inject import inject, unload
    from lorakit.io import load_adapter, read_adapter, save_adapter, save_merged_model
    from lorakit.merge import merge, merge_and_unload, unmerge
    from lorakit.peft_compat import PeftModel, get_peft_model
    from lorakit.peft_state_dict import get_peft_model_state_dict, set_peft_model_state_dict
    from lorakit.state import active_adapters, adapter_configs, delete_adapter, set_active
    from lorakit.targets import find_targets

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "BaseModelMismatchError",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "ParameterCount",
    "PeftModel",
    "TaskType",
    "UserError",
    "active_adapters",
    "adapter_configs",
    "combine",
    "count_parameters",
    "delete_adapter",
    "disabled",
    "find_targets",
    "get_peft_model",
    "get_peft_model_state_dict",
    "initialize_lora_eva_weights",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "save_merged_model",
    "set_active",
    "set_peft_model_state_dict",
    "unload",
    "unmerge",
    "use_adapters",
]

_HOMES = {
    "ParameterCount": "accounting",
    "count_parameters": "accounting",
    "print_trainable_parameters": "accounting",
    "combine": "combining",
    "LoraConfig": "config",
    "TaskType": "config",
    "AdapterFileError": "errors",
    "BaseModelMismatchError": "errors",
    "UserError": "errors",
    "initialize_lora_eva_weights": "eva",
    "EvaConfig": "init_methods",
    "LoftQConfig": "init_methods",
    "inject": "inject",
    "unload": "inject",
    "load_adapter": "io",
    "read_adapter": "io",
    "save_adapter": "io",
    "save_merged_model": "io",
    "merge": "merge",
    "merge_and_unload": "merge",
    "unmerge": "merge",
    "PeftModel": "peft_compat",
    "get_peft_model": "peft_compat",
    "get_peft_model_state_dict": "peft_state_dict",
    "set_peft_model_state_dict": "peft_state_dict",
    "active_adapters": "state",
    "adapter_configs": "state",
    "delete_adapter": "state",
    "disabled": "adapter_choice",
    "set_active": "state",
    "use_adapters": "adapter_choice",
    "find_targets": "targets",
}


lazy_exports(__name__, _HOMES)
