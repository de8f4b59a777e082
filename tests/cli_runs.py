"""lorakit's CLI run in process for the tests: any command with its exit code and printed output
(``run_cli``); ``lorakit train`` and ``lorakit demo`` naming their model, data and output and
hiding the progress bar, the settings that differ following."""

from __future__ import annotations

from lorakit import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``lorakit ARGV...`` (each turned into a string) in process: ``(exit code, stdout,
    stderr)`` as pytest's ``capsys`` captured them."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
