"""``lorakit train``'s dropout on a model whose experts are adapted as bare parameters.

On a fused-MoE model (``lorakit.moe_targets``: Mixtral, Qwen3-MoE, OLMoE, ... in transformers 5)
the expert projections that ``--target-modules`` names (all-linear, the default, included), and
a router such as Mixtral's ``gate``, are adapted through ``target_parameters``, whose update is
folded into the weight: there is no LoRA input to drop out (PEFT refuses ``lora_dropout``
there). So:

- ``--dropout`` not given (neither as a flag nor in ``--config``): 0 on such a model, said in
  one line on stderr; elsewhere the default (0.05);
- ``--dropout`` given above 0 on such a model: a ``UserError`` saying to pass ``--dropout 0``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lorakit.errors import UserError

__all__ = ["dropout_for_model"]


def dropout_for_model(values: dict[str, Any], given: bool) -> dict[str, Any]:
    """``values`` (``{key: value}`` of ``merged_values``) with the dropout the rule of the
    module docstring gives; ``given``: ``--dropout`` came from the command line or the config
    file. The model is built on the meta device only (no weights read)."""
    dropout = values["dropout"]
    if not dropout or not (parameters := _adapted_parameters(values)):
        return values
    if given:
        raise UserError(
            f"--dropout {dropout:g}: this model's mixture-of-experts parameters {parameters} are "
            "adapted as bare parameters (target_parameters, as PEFT converts fused-MoE "
            "targets), whose update is folded into the weight and takes no dropout; pass "
            "--dropout 0"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0
        print(
            f"lorakit: note: training with --dropout 0 (not the default {dropout:g}): this "
            f"model's mixture-of-experts parameters ({', '.join(parameters)}) are adapted as "
            "bare parameters, which take no dropout",
            file=sys.stderr,
        )
    return {**values, "dropout": 0.0}


def _adapted_parameters(values: dict[str, Any]) -> list[str]:
    """The ``target_parameters`` that ``--target-modules`` becomes on the model (empty when
    none, or when the model or a setting cannot be judged here: the run reports that). Only a
    local model directory is looked at: no built-in model is a fused MoE, and resolving one
    may convert it, which is the run's job."""
    from lorakit.meta_model import build_meta_model
    from lorakit.moe_targets import convert_moe_config, fused_moe_family_of
    from lorakit.train.settings import TrainSettings

    directory = Path(str(values["model"])).expanduser()
    if fused_moe_family_of(_model_type(directory / "config.json")) is None:
        return []  # (no model is built for a model of another type, nor for a built-in)
    try:
        meta_model, _ = build_meta_model(str(directory))
        lora = TrainSettings(
            model=values["model"],
            data=values["data"],
            target_modules=values["target_modules"],
            dropout=0.0,  # (the conversion itself refuses a dropout)
        ).lora_config()
        return list(convert_moe_config(meta_model, lora).target_parameters or [])
    except (UserError, ValueError, TypeError):
        return []


def _model_type(config_path: Path) -> object:
    """The ``model_type`` of a transformers ``config.json``; None where there is none to read."""
    try:
        return json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
