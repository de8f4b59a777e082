"""``lorakit --help`` and ``import lorakit`` do not import torch or transformers.

They used to: the package ``__init__`` imported the whole library, and the command parsers
read names from torch-importing modules, so every ``--help`` paid about 3-5 s. The packages
now export lazily (``lorakit.lazy_exports``); these tests hold that in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorakit
import lorakit.io
import lorakit.train

HEAVY = ("torch", "transformers", "numpy", "safetensors")


def _heavy_imports(code: str) -> list[str]:
    """The heavy packages a fresh interpreter holds after running ``code``."""
    check = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout.split()


def test_import_lorakit_is_light():
    assert _heavy_imports("import lorakit, lorakit.io, lorakit.train") == []


def test_every_parser_is_built_without_torch():
    code = "from lorakit.cli import build_parser\nbuild_parser()"
    assert _heavy_imports(code) == []


def test_help_of_every_command_is_light():
    from lorakit.cli import command_modules

    code = "\n".join(
        [
            "import contextlib, io",
            "from lorakit.cli import build_parser",
            f"for name in {command_modules()!r}:",
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):",
            "        build_parser().parse_args([name, '--help'])",
        ]
    )
    assert _heavy_imports(code) == []


@pytest.mark.parametrize("package", [lorakit, lorakit.io, lorakit.train])
def test_every_exported_name_resolves_and_is_listed(package):
    for name in package.__all__:
        value = getattr(package, name)
        assert value is not None
        assert name in dir(package)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        package.not_a_name  # noqa: B018


def test_the_lazy_names_are_the_modules_objects():
    from lorakit.config import LoraConfig
    from lorakit.io.load import load_adapter
    from lorakit.train.loop import train

    assert lorakit.LoraConfig is LoraConfig
    assert lorakit.load_adapter is load_adapter is lorakit.io.load_adapter
    assert lorakit.train.train is train


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from lorakit import *", namespace)
    assert set(lorakit.__all__) <= set(namespace)


def test_a_name_shared_with_its_submodule_stays_the_function_whatever_the_import_order():
    """``lorakit.inject`` / ``lorakit.merge`` are functions (as with an eager ``__init__``),
    also when another module imported the submodules ``lorakit.inject`` / ``lorakit.merge``
    first (the import system binds a submodule to its package's attribute)."""
    code = "\n".join(
        [
            "import lorakit",
            "import lorakit.plan, lorakit.merge, lorakit.inject",
            "from lorakit.inject import inject",
            "assert lorakit.inject is inject, lorakit.inject",
            "assert callable(lorakit.merge) and callable(lorakit.unload)",
        ]
    )
    _heavy_imports(code)  # raises CalledProcessError on a failed assertion


def test_getattr_with_a_default_gives_the_default_for_any_missing_name():
    assert getattr(lorakit, "x.y", "default") == "default"
    assert getattr(lorakit, "not_a_module", None) is None
    assert not hasattr(lorakit.io, "x.y")
