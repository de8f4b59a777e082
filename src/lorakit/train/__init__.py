"""Training LoRA adapters: our own loop (``train``), checkpoints with exact resume, DDP.

    from lorakit.train import TrainingConfig, train, pad_collate
    result = train(model, examples, pad_collate(tokenizer.pad_token_id),
                   TrainingConfig(output_dir="run", max_steps=100, lr=2e-4))

Modules: ``config`` (TrainingConfig; its ``setting`` fields are also ``lorakit train``
options), ``settings`` (the command's other settings, the config file), ``run`` (the command's
run), ``schedule`` (warmup + cosine), ``optim`` (AdamW, LoRA+ groups), ``batches``
(deterministic batch plan, padding), ``losses`` (token-sum loss, evaluation), ``checkpoint`` +
``rng`` (atomic checkpoints, RNG capture), ``output_dir`` (one run per directory), ``metrics``
(JSONL, loss curve), ``distributed`` (torchrun / DDP), ``loop`` (the loop itself).
"""

from typing import TYPE_CHECKING

from lorakit.lazy_exports import lazy_exports

if TYPE_CHECKING:  # at run time ``__getattr__`` loads these on first use
    from lorakit.train.batches import BatchOrder, pad_collate
    from lorakit.train.checkpoint_dirs import latest_checkpoint
    from lorakit.train.config import TrainingConfig
    from lorakit.train.gradient_checkpointing import enable_gradient_checkpointing
    from lorakit.train.loop import train
    from lorakit.train.losses import evaluate, exact_match_counts
    from lorakit.train.optim import build_optimizer, parameter_groups
    from lorakit.train.run_finish import TrainResult
    from lorakit.train.schedule import lr_factor

__all__ = [
    "BatchOrder",
    "TrainResult",
    "TrainingConfig",
    "build_optimizer",
    "enable_gradient_checkpointing",
    "evaluate",
    "exact_match_counts",
    "latest_checkpoint",
    "lr_factor",
    "pad_collate",
    "parameter_groups",
    "train",
]

lazy_exports(
    __name__,
    {
        "BatchOrder": "batches",
        "TrainResult": "run_finish",
        "TrainingConfig": "config",
        "build_optimizer": "optim",
        "enable_gradient_checkpointing": "gradient_checkpointing",
        "evaluate": "losses",
        "exact_match_counts": "losses",
        "latest_checkpoint": "checkpoint_dirs",
        "lr_factor": "schedule",
        "pad_collate": "batches",
        "parameter_groups": "optim",
        "train": "loop",
    },
)
