"""Importing a script of experiments/ in a test: experiments/ on the path only for that test,
and its modules out of ``sys.modules`` afterwards (benchmarks/ has a ``common`` module too, which
``import common`` must find again)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def imported(monkeypatch, name: str, modules: Sequence[str]) -> Iterator[object]:
    """Yield experiments/``name``.py as a module (a fixture's body); ``modules``: every
    experiment module it may import, removed afterwards and the previous ones put back."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    saved = {module: sys.modules.pop(module) for module in modules if module in sys.modules}
    yield importlib.import_module(name)
    for module in modules:
        sys.modules.pop(module, None)
    sys.modules.update(saved)
