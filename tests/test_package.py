"""The package itself: light to import, a tidy public API, a CLI that answers in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from lorakit import cli

# The subprocesses import this checkout's lorakit, whatever version is installed.
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = os.environ | {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}

HEAVY = ("transformers", "peft", "fastapi", "uvicorn", "matplotlib", "trl", "openai")


def test_import_pulls_in_nothing_heavy_beyond_torch() -> None:
    code = (
        f"import sys, lorakit; print([m for m in {HEAVY!r} if m in sys.modules], lorakit.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV
    )
    heavy, _, imported = out.stdout.strip().partition(" ")
    assert heavy == "[]" and imported.startswith(SRC), out.stdout


def test_public_api_is_explicit() -> None:
    assert sorted(lorakit.__all__) == sorted(set(lorakit.__all__))
    for name in lorakit.__all__:
        assert hasattr(lorakit, name), name


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    for name in cli.command_modules():
        assert name in out.stdout


def test_cli_bad_arguments_give_one_line(capsys) -> None:
    code = cli.main(["no-such-command"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "invalid choice" in err and "Traceback" not in err


def test_commands_that_build_a_model_print_no_third_party_import_noise() -> None:
    """With torchao installed (the dev/quant extras), building any transformers model imports it,
    and it logs that its CUDA kernels cannot load, beside torch's pytree deprecation notes: the
    CLI keeps those off the user's screen."""
    pytest.importorskip("torchao")  # installed by scripts/setup.sh; without it there is no noise
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "plan", "llama-2-7b", "--rank", "16"],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
    )
    assert "39,976,960" in out.stdout
    assert "Failed to load" not in out.stderr and "Enum subclass" not in out.stderr, out.stderr
