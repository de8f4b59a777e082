"""``TrainingConfig``: every knob of the training loop, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lorakit.errors import UserError

__all__ = ["SettingError", "TrainingConfig"]


class SettingError(UserError):
    """A ``TrainingConfig`` field with a bad value: ``setting`` names the field, ``problem``
    says what is wrong (the CLI names its flag instead of the field)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


@dataclass
class TrainingConfig:
    """Settings of ``lorakit.train.train``.

    One optimizer step sees ``batch_size * grad_accum * world_size`` examples (the global batch).
    Length of the run: ``max_steps`` if set, else ``epochs`` passes over the data.
    """

    output_dir: str = "lorakit-run"
    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float = 1.0
    batch_size: int = 8  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    loraplus_ratio: float | None = None  # LoRA+: B trains at lr * ratio
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default: ceil(warmup_ratio * total steps)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float | None = 1.0  # clip the global L2 norm of the gradients; None: off
    eval_every: int = 0  # steps between evaluations (0: only at the end if eval data is given)
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    progress: bool = True  # tqdm progress bar
    plot: bool = True  # loss-curve PNG at the end
    adapter_name: str = "default"
    overwrite: bool = False  # a new run may delete a previous run in output_dir (see train)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingError(name, f"must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingError("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise SettingError("epochs", f"must be > 0 (or give max_steps), got {self.epochs}")
        if not self.lr > 0:
            raise SettingError("lr", f"must be > 0, got {self.lr}")
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise SettingError("loraplus_ratio", f"must be > 0, got {self.loraplus_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SettingError(
                "max_grad_norm", f"must be > 0 (or None to disable), got {self.max_grad_norm}"
            )
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise SettingError(name, f"must be >= 0, got {value}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingError(name, f"must be in [0, 1], got {getattr(self, name)}")

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, round(self.epochs * steps_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
