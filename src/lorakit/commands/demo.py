"""``lorakit demo``: fine-tune SmolLM2-135M-Instruct on movie-review sentiment and report.

The options are the ``setting`` fields of ``lorakit.demo.DemoSettings``.
"""

from __future__ import annotations

import argparse

from lorakit.commands.train import add_setting_options
from lorakit.demo import DemoSettings  # lorakit.demo imports nothing heavy at module level
from lorakit.errors import UserError
from lorakit.train.config import SettingError, flag_name, setting_fields, setting_key


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: LoRA-teach SmolLM2 movie-review sentiment, before/after accuracy",
        description=(
            "Load SmolLM2-135M-Instruct (packaged, offline), measure zero-shot accuracy on "
            "held-out Rotten Tomatoes test reviews, fine-tune a LoRA adapter (r=16, all seven "
            "projections) on the training split, measure again, save the adapter, merge it and "
            "check the merged model agrees, write loss_curve.png and summary.json/.txt."
        ),
    )
    add_setting_options(parser, DemoSettings, unset=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.demo import run_demo

    options = setting_fields(DemoSettings)
    arguments = {}
    for option in options:
        value = getattr(args, setting_key(option))
        arguments[option.name] = (not value) if option.metadata["negated"] else value
    try:
        settings = DemoSettings(**arguments)
    except SettingError as error:
        flag = next(flag_name(f) for f in options if f.name == error.setting)
        raise UserError(f"{flag} {error.problem}") from None
    run_demo(settings)
    return 0
