"""Checks of what ``lorakit.train.train`` is given, made before anything is written or run:
each would otherwise fail (or be ignored) only after the whole run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import UserError
from lorakit.state import adapter_configs, lora_layers
from lorakit.train.config import TrainingConfig
from lorakit.train.optim import parameter_groups

__all__ = ["check_inputs"]


def check_inputs(model: nn.Module, config: TrainingConfig, eval_data: Sequence[Any] | None) -> None:
    """``UserError`` unless the model has parameters to train (``parameter_groups``),
    ``config.adapter_name`` names an adapter of it (its save would fail only after the whole
    run), and evaluation data is given where ``config.eval_every`` asks for evaluations
    (else they would be silently skipped), and ``config.output_dir`` is not a file (its
    first write would fail only after a step had changed the adapter), and some layer scales the
    adapter by more than 0 (``_check_some_scale``)."""
    parameter_groups(model)
    output = Path(config.output_dir) if config.output_dir else None
    if output is not None and output.exists() and not output.is_dir():
        raise UserError(
            f"output_dir {output} is a file (TrainingConfig.output_dir, --output); give a "
            "directory (new or existing)"
        )
    name, configs = config.adapter_name, adapter_configs(model)
    if name not in configs:
        has = f"its adapters: {', '.join(map(repr, sorted(configs)))}" if configs else "none"
        raise UserError(
            f"the model has no adapter named {name!r} (TrainingConfig.adapter_name; {has}): "
            "pass the name the adapter was injected under as adapter_name, or inject one "
            "under that name (lorakit.inject(model, config, adapter_name=...))"
        )
    _check_some_scale(model, name)
    if config.eval_every and not eval_data:
        raise UserError(
            f"eval_every={config.eval_every} (--eval-every) evaluates on eval_data, and none "
            "was given: pass eval_data (--eval-data SPEC), or leave eval_every at 0"
        )


def _check_some_scale(model: nn.Module, name: str) -> None:
    """``UserError`` when every layer scales adapter ``name`` by 0 (``lora_alpha`` 0, as PEFT
    allows, e.g. ``--alpha 0``) and the adapter trains nothing else (no DoRA magnitude, saved
    module, token rows or biases): ``s B A`` is then 0 and so are the gradients of A and B, so
    the run could only save an adapter that changes nothing."""
    config = adapter_configs(model)[name]
    if config.use_dora or config.modules_to_save or config.trainable_token_indices:
        return  # (magnitudes, saved copies, token rows: trained whatever s is)
    if config.bias != "none":
        return  # (the base's biases train)
    scales = [layer.scalings[name] for _, layer in lora_layers(model) if name in layer.scalings]
    if scales and all(scale == 0 for scale in scales):
        raise UserError(
            f"adapter {name!r} has lora_alpha 0 (--alpha) on every layer: its update "
            "(lora_alpha / r) B A is 0 and nothing would train. Give a non-zero lora_alpha "
            "(the default is 32; a negative one flips the update's sign)."
        )
