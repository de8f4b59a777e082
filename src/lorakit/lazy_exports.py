"""Package attributes loaded on first use, so that importing a package, and so ``lorakit
--help``, does not import torch and transformers (about 3 s) before they are needed.

    lazy_exports(__name__, {"LoraConfig": "config", ...})   # at the end of a package __init__

maps each public name to the submodule (relative to the package) that defines it. The package
then behaves as if its ``__init__`` had imported every name eagerly: ``package.name`` and
``from package import name`` give the object, and where a name is also a submodule's
(``lorakit.inject``, ``lorakit.merge``) it stays the function however the submodule gets
imported later (an eager ``__init__`` rebinds it after importing the submodule; here the
import system's binding of the submodule is skipped for those names).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping


class LazyPackage(types.ModuleType):
    """A package module whose ``_lazy_homes`` names are imported on first access."""

    _lazy_homes: Mapping[str, str]

    def __getattr__(self, name: str) -> object:
        """Called for names not yet bound: an exported name (import its home, bind it), a
        submodule (import it, as an eager ``__init__`` would have), else ``AttributeError``."""
        package = self.__name__
        home = self.__dict__.get("_lazy_homes", {}).get(name)
        if home is not None:
            value = getattr(importlib.import_module(f"{package}.{home}"), name)
            self.__dict__[name] = value
            return value
        if name.isidentifier() and not name.startswith("__") and _is_submodule(package, name):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        submodule = (
            isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}"
        )
        if submodule and name in self.__dict__.get("_lazy_homes", {}):
            return  # the exported function keeps the name (see the module docstring)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("_lazy_homes", {})))


def _is_submodule(package: str, name: str) -> bool:
    """Whether ``package.name`` is a module that can be imported (``find_spec``'s errors, e.g.
    for a name with a dot, read as no: ``getattr(package, name, default)`` gives the default)."""
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


def lazy_exports(package: str, homes: Mapping[str, str]) -> None:
    """Make ``sys.modules[package]`` a ``LazyPackage`` exporting ``homes`` (name -> submodule)."""
    module = sys.modules[package]
    module.__class__ = LazyPackage
    module.__dict__["_lazy_homes"] = dict(homes)
