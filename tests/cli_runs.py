"""``lorakit train`` run in process for the CLI tests: every run names its model, data and output
and hides the progress bar; the settings that differ follow."""

from __future__ import annotations

from lorakit import cli


def train_cli(model, data, output, *settings: str) -> int:
    """``lorakit train --model MODEL --data DATA --output OUTPUT --no-progress SETTINGS...``;
    returns its exit code."""
    command = ["train", "--model", str(model), "--data", str(data), "--output", str(output)]
    return cli.main([*command, "--no-progress", *settings])
