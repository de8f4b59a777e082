"""The package itself: light to import, a tidy public API, a CLI that answers in one line."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import types
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


@pytest.mark.parametrize("package", ["lorakit", "lorakit.io", "lorakit.train"])
def test_lazy_exports_are_listed_alike_three_times(package: str) -> None:
    """Each lazy package names its exports three times, as the tools need: the ``if
    TYPE_CHECKING:`` imports (type checkers), a literal ``__all__`` (ruff, ``import *``) and the
    ``lazy_exports`` map (run time). The three must name the same objects from the same modules."""
    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__).read_text())
    (guard,) = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    imported = {
        alias.name: node.module.removeprefix(package + ".").split(".")[0]
        for node in guard.body
        for alias in node.names
    }
    homes = module._lazy_homes
    assert imported == {name: home.split(".")[0] for name, home in homes.items()}
    assert set(homes) <= set(module.__all__) and len(module.__all__) == len(set(module.__all__))
    eager = set(module.__all__) - set(homes)
    assert all(isinstance(getattr(module, name), types.ModuleType) for name in eager), eager
    for name in homes:
        assert getattr(module, name) is getattr(
            importlib.import_module(f"{package}.{homes[name]}"), name
        )


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
