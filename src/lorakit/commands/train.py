"""``lorakit train``: fine-tune a LoRA adapter on a model (flags, or a YAML/JSON config file).

The options are the ``setting`` fields of ``TrainSettings`` and ``TrainingConfig``
(``lorakit.train.settings``): a new option is one new field there, with its help text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.train.config import flag_name
from lorakit.train.settings import option_fields, setting_defaults, setting_key, setting_kind


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
    defaults = setting_defaults()
    for option in option_fields():
        key, text = setting_key(option), option.metadata["help"]
        flags = (flag_name(option), *option.metadata["aliases"])
        if setting_kind(option) is bool:  # given: True; not given: None (the file decides)
            parser.add_argument(*flags, dest=key, action="store_true", default=None, help=text)
            continue
        if "(default:" not in text and "(required" not in text:
            text += f" (default: {defaults[key]})"
        kind = setting_kind(option)
        parser.add_argument(*flags, dest=key, type=kind, default=None, help=text)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.train.run import train_from_settings
    from lorakit.train.settings import merged_values

    values = merged_values(args.config, vars(args))
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
