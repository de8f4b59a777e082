"""``TrainingConfig``: every knob of the training loop, validated once.

Each field is documented once, where it is declared. A field made with ``setting(default,
help)`` is also a ``lorakit train`` option: its flag is ``--`` + the field name with dashes
unless ``flag=`` names another, and the config file uses the flag's name with underscores
(``lorakit.train.settings`` reads them; ``lorakit.commands.train`` builds the parser).
"""

from __future__ import annotations

import math
import numbers
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from lorakit.config_values import is_finite_number, is_positive_number
from lorakit.errors import UserError

__all__ = [
    "SettingError",
    "TrainingConfig",
    "flag_name",
    "setting",
    "setting_fields",
    "setting_key",
    "setting_kind",
]


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    negated: bool = False,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field that is also a command-line option. ``help``: its help text (the
    parser adds "(default: X)" unless the text mentions its default); ``flag``: the flag when it
    is not ``--<name-with-dashes>``; ``aliases``: more spellings of the flag; ``negated``: a
    bool whose flag turns it off (``progress`` is ``--no-progress``); ``choices``: the values
    allowed."""
    metadata = {
        "help": help,
        "flag": flag,
        "aliases": aliases,
        "negated": negated,
        "choices": choices,
    }
    return field(default=default, metadata=metadata)


def flag_name(setting_field: Field) -> str:
    """The command-line flag of a ``setting`` field (``max_steps`` -> ``--steps``)."""
    return setting_field.metadata.get("flag") or "--" + setting_field.name.replace("_", "-")


def setting_key(setting_field: Field) -> str:
    """A setting's key in config files: its flag without dashes (``--steps`` -> ``steps``)."""
    return flag_name(setting_field)[2:].replace("-", "_")


def setting_fields(owner: type) -> list[Field]:
    """The ``setting`` fields (those with a help text) of the dataclass ``owner``."""
    return [f for f in fields(owner) if "help" in f.metadata]


def setting_kind(owner: type, setting_field: Field) -> type:
    """The scalar type of a setting of ``owner`` (``int | None`` -> int, ``str | list[str]``
    -> str)."""
    hint = typing.get_type_hints(owner)[setting_field.name]
    kinds = typing.get_args(hint) or (hint,)
    return next(kind for kind in (bool, int, float, str) if kind in kinds)


STRATEGIES = ("ddp", "fsdp")  # see lorakit.train.distributed
SEED_RANGE = (-(2**63), 2**63 - 1)
"""The seeds training takes: torch's generators take [-2**63, 2**64 - 1], and the loop seeds
them with ``seed + epoch`` (the batches), ``seed + rank`` and ``seed + rank + step`` (a
resumed run), so a seed keeps the upper half of that range as room for those sums."""


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
    Length of the run: ``max_steps`` if set, else ``epochs`` passes over the data (counted up to
    whole steps, ``total_steps``).
    """

    output_dir: str = setting(
        "lorakit-run",
        "output directory (adapter/, checkpoints/, metrics.jsonl, loss_curve.png, "
        "train_settings.json)",
        flag="--output",
    )
    max_steps: int | None = setting(
        None, "optimizer steps, overriding --epochs (default: from --epochs)", flag="--steps"
    )
    epochs: float = setting(
        1.0,
        "passes over the training data; a fraction's steps are counted up, as transformers "
        "does (2.5 epochs of 3 steps: 8 steps)",
    )
    batch_size: int = setting(8, "examples per micro-batch (per process)")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    lr: float = setting(2e-4, "peak learning rate (AdamW, warmup then cosine)")
    loraplus_ratio: float | None = setting(
        None, "LoRA+: B learns at lr * ratio, e.g. 16 (default: off)"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int | None = None  # default: ceil(warmup_ratio * total steps)
    warmup_ratio: float = setting(0.05, "fraction of the steps spent warming up, in [0, 1]")
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float | None = setting(1.0, "clip the gradient norm to this")  # None: off
    eval_every: int = setting(0, "evaluate every N steps (0: only at the end)")
    checkpoint_every: int = setting(0, "write a checkpoint every N steps (0: none)")
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep (>= 1)")
    seed: int = setting(0, "random seed (adapter initialisation, batches, dropout)")
    strategy: str = setting(
        "ddp",
        "how processes under torchrun share the work: ddp (each holds the whole model) or fsdp "
        "(FSDP2: the base and the adapter sharded, each process holds about 1/N; needs torchrun "
        "with 2 or more processes)",
        choices=STRATEGIES,
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward to save memory"
    )
    progress: bool = setting(True, "no progress bar", flag="--no-progress", negated=True)
    plot: bool = True  # loss-curve PNG at the end
    adapter_name: str = "default"
    overwrite: bool = setting(
        False,
        "delete a previous run in --output (adapter/, checkpoints/, metrics.jsonl, "
        "loss_curve.png, train_settings.json) and start over; without it (or --resume) such a "
        "directory is refused",
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingError(name, f"must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingError("max_steps", f"must be >= 1, got {self.max_steps}")
        if not is_positive_number(self.epochs):  # (with max_steps too: the run records it)
            hint = " (or give max_steps)" if self.max_steps is None else ""
            raise SettingError("epochs", f"must be a finite number > 0{hint}, got {self.epochs}")
        if not is_positive_number(self.lr):
            raise SettingError("lr", f"must be a finite number > 0, got {self.lr}")
        if self.loraplus_ratio is not None and not is_positive_number(self.loraplus_ratio):
            raise SettingError(
                "loraplus_ratio", f"must be a finite number > 0, got {self.loraplus_ratio}"
            )
        if self.max_grad_norm is not None and not is_positive_number(self.max_grad_norm):
            raise SettingError(
                "max_grad_norm",
                f"must be a finite number > 0 (or None to disable), got {self.max_grad_norm}",
            )
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (is_finite_number(value) and value >= 0):
                raise SettingError(name, f"must be a finite number >= 0, got {value}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise SettingError("seed", f"must be an integer, got {self.seed!r}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise SettingError(
                "seed", f"must be an integer in [-2**63, 2**63 - 1], got {self.seed}"
            )
        if self.strategy not in STRATEGIES:
            raise SettingError("strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingError(name, f"must be in [0, 1], got {getattr(self, name)}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` if set, else ``max(1, ceil(epochs * steps_per_epoch))`` as
        ``transformers.Trainer`` counts them (2.5 epochs of 1 step: 3 steps, the last epoch
        partly run); a product that float rounding puts just above a whole number (``1e-9``)
        counts as that number."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
