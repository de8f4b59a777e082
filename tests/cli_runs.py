"""``lorakit train`` and ``lorakit demo`` run in process for the CLI tests: every run names its
model, data and output and hides the progress bar; the settings that differ follow."""

from __future__ import annotations

from lorakit import cli


def train_cli(model, data, output, *settings: str) -> int:
    """``lorakit train --model MODEL --data DATA --output OUTPUT --no-progress SETTINGS...``;
    returns its exit code."""
    command = ["train", "--model", str(model), "--data", str(data), "--output", str(output)]
    return cli.main([*command, "--no-progress", *settings])


def demo_settings(output, model, **overrides):
    """The demo's settings for a quick run in ``output`` on ``model``: 2 steps, 8 held-out
    reviews, 64 tokens, no progress bar; ``overrides`` change any field."""
    from lorakit.demo import DemoSettings

    fields = dict(
        output=str(output), model=str(model), steps=2, eval_size=8, max_length=64, progress=False
    )
    return DemoSettings(**(fields | overrides))
