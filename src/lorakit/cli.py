"""The ``lorakit`` command. Each subcommand lives in ``lorakit.commands.<name>`` and is imported
only when needed, so ``lorakit --help`` stays fast."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import pkgutil
import sys

from lorakit import __version__
from lorakit.errors import UserError

__all__ = ["main"]


def command_modules() -> list[str]:
    """Every module in ``lorakit.commands`` but its helpers (names starting with ``_``); each
    exposes ``register(subparsers)`` and sets ``func=run`` on its parser. Command modules keep
    their heavy imports inside ``run``."""
    import lorakit.commands as package

    names = (info.name for info in pkgutil.iter_modules(package.__path__))
    return sorted(name for name in names if not name.startswith("_"))


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one readable line instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("lorakit").strip()  # main prints "lorakit: error: "
        raise UserError(f"{command + ': ' if command else ''}{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorakit",
        description="LoRA adapters: inject, train, save (PEFT format), merge, serve, analyse.",
    )
    parser.add_argument(
        "--version", action="version", version=f"lorakit {__version__}", help="print the version"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"lorakit.commands.{name}").register(subparsers)
    return parser


# Warnings third-party packages log when transformers imports them, about their own build and
# nothing the user can act on: torchao (installed for quantized bases) cannot load its CUDA
# kernels on a CPU machine, and registers enums that torch's pytree now handles natively.
_IMPORT_TIME_NOISE = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    for name in _IMPORT_TIME_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"lorakit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lorakit plan ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except OSError as error:  # the file system refused: a permission, a full disk, a read-only dir
        if error.filename is None:
            raise
        print(f"lorakit: error: {file_system_message(error)}", file=sys.stderr)
        return 1


def file_system_message(error: OSError) -> str:
    """``error`` as one line naming the path and what the file system said, with a remedy."""
    path = error.filename
    if error.filename2 is not None:
        path = f"{path} -> {error.filename2}"
    remedies = {
        errno.EACCES: "check the permissions, or choose another path",
        errno.EPERM: "check the permissions (and immutable flags), or choose another path",
        errno.ENOSPC: "free space and run again",
        errno.EROFS: "the file system is read-only; choose another path",
    }
    remedy = remedies.get(error.errno, "fix the path and run again")
    return f"{error.strerror or error}: {path}; {remedy}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
