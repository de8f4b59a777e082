"""``lorakit train``: fine-tune a LoRA adapter on a model (flags, or a YAML/JSON config file).

The options are the ``setting`` fields of ``TrainSettings`` and ``TrainingConfig``
(``lorakit.train.settings``): a new option is one new field there, with its help text.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING
from pathlib import Path

from lorakit.train.config import (
    TrainingConfig,
    flag_name,
    setting_fields,
    setting_key,
    setting_kind,
)
from lorakit.train.settings import TrainSettings


def add_setting_options(parser: argparse.ArgumentParser, owner: type, *, unset: bool) -> None:
    """One option per ``setting`` field of the dataclass ``owner``, its destination the field's
    key. "(default: X)" is added to a help text that does not mention its default. ``unset``:
    every option defaults to None (so that only the flags given override a config file)."""
    for option in setting_fields(owner):
        key, text, kind = setting_key(option), option.metadata["help"], setting_kind(owner, option)
        flags = (flag_name(option), *option.metadata["aliases"])
        if kind is bool:  # a switch: given, True
            default = None if unset else False
            parser.add_argument(*flags, dest=key, action="store_true", default=default, help=text)
            continue
        default = option.default if option.default is not MISSING else None
        if "(default:" not in text and "(required" not in text:
            text += f" (default: {default})"
        parser.add_argument(
            *flags,
            dest=key,
            type=kind,
            choices=option.metadata["choices"],
            default=None if unset else default,
            help=text,
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter (flags or --config FILE)",
        description=(
            "Train a LoRA adapter with lorakit's loop. Every setting can come from a YAML/JSON "
            "file (--config; keys as the flag names with underscores); flags override the file. "
            "Under torchrun (--nproc_per_node N) it trains data-parallel."
        ),
    )
    parser.add_argument("--config", help="YAML or JSON file with settings (default: none)")
    for owner in (TrainSettings, TrainingConfig):
        add_setting_options(parser, owner, unset=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.commands.combine import warnings_as_lines
    from lorakit.commands.extract import refuse_empty
    from lorakit.train.config_file import load_config_file, merged_values
    from lorakit.train.parameter_dropout import dropout_for_model
    from lorakit.train.run import train_from_settings

    values = merged_values(args.config, vars(args))
    refuse_empty(
        "--output", values["output"], "give a directory for the run (default: lorakit-run)"
    )
    dropout_given = args.dropout is not None or (
        bool(args.config) and "dropout" in load_config_file(args.config)
    )
    values = dropout_for_model(values, dropout_given)
    with warnings_as_lines(_flag_spelling):  # (one line per message, not per call site)
        result = train_from_settings(values)
    if result.adapter_dir is not None:  # the main process (rank 0 under torchrun)
        report = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            **{f"eval_{k}": v for k, v in result.eval_metrics.items()},
            "adapter": str(result.adapter_dir),
        }
        print(json.dumps(report))
        print(f"adapter saved to {Path(values['output']) / 'adapter'}")
    return 0


def _flag_spelling(message: str) -> str:
    """A library warning as ``lorakit train`` says it: its flag, not the Python argument
    (``lora_bias=True`` is ``--lora-bias``)."""
    return message.replace("set lora_bias=False", "leave out --lora-bias").replace(
        "lora_bias=True", "--lora-bias"
    )
