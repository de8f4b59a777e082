"""The ``lorakit`` command. Each subcommand lives in ``lorakit.commands.<name>`` and is imported
only when needed, so ``lorakit --help`` stays fast."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path

from lorakit import __version__
from lorakit.errors import FanInFanOutWarning, UserError

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


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option is reported by the subcommand's parser,
    so that the message points to ``lorakit COMMAND --help`` (where the options are listed)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        reporter = _subcommand_parser(parser, getattr(args, "command", None)) or parser
        reporter.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _subcommand_parser(
    parser: argparse.ArgumentParser, command: str | None
) -> argparse.ArgumentParser | None:
    """The parser of subcommand ``command`` (None when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return None


# Warnings third-party packages log when transformers imports them, about their own build and
# nothing the user can act on: torchao (installed for quantized bases) cannot load its CUDA
# kernels on a CPU machine, and registers enums that torch's pytree now handles natively.
_IMPORT_TIME_NOISE = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    """Run ``lorakit`` with ``argv`` (default: the command line); the exit status. A process of
    a ``torchrun`` run ends here (``train.distributed.end_distributed_process``)."""
    code = _run(argv)
    if "torch.distributed" in sys.modules:  # (only a command that trained can be in a group)
        from lorakit.train.distributed import end_distributed_process

        end_distributed_process(code)
    return code


def _run(argv: list[str] | None) -> int:
    for name in _IMPORT_TIME_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    # the commands set no fan_in_fan_out: lorakit's layers read each layer's layout, and the
    # saved file gets PEFT's value; the warning's "pass fan_in_fan_out=..." has no option here
    warnings.filterwarnings("ignore", category=FanInFanOutWarning)
    parser = build_parser()
    args = None
    try:
        args = parse_arguments(parser, argv)
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
    except Exception as error:  # the file system refused: a permission, a full disk, ...
        message = file_system_failure(error, getattr(args, "output", None))
        if message is None:  # a bug: the traceback is the report
            raise
        print(f"lorakit: error: {message}", file=sys.stderr)
        return 1


def file_system_failure(error: BaseException, output: str | None = None) -> str | None:
    """The one-line report of a file system failure, or None when ``error`` is not one: an
    ``OSError`` naming its path (``file_system_message``), or a write that failed without a
    name (``write_failure``: a full disk, a file-size limit, a short write). ``output``: the
    command's ``--output``, named instead of the temporary files written beside it."""
    if isinstance(error, OSError) and error.filename is not None:
        return file_system_message(error, output)
    cause = write_failure(error)
    if cause is None:
        return None
    where = f"--output {output}: " if output is not None else ""
    return (
        f"cannot write the output ({where}{cause}): free space on its disk (or raise the "
        "file-size limit, ulimit -f) and run again"
    )


# The errno values of a write the disk cannot take: no space, over the quota, over the size limit.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# numpy's ``tofile`` (gguf's writer) on a full disk: "4096 requested and 3176 written".
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def write_failure(error: BaseException) -> str | None:
    """What the file system said when a write failed without naming a file (an ``OSError`` of
    a full disk, a file-size limit or a short write, or safetensors' ``SafetensorError``
    "Error while serializing: I/O error: ..."), else None."""
    if isinstance(error, OSError):
        if error.errno in _DISK_FULL:
            return error.strerror or str(error)
        short = _SHORT_WRITE.fullmatch(str(error))
        return None if short is None else f"short write, {short[2]} of {short[1]} bytes"
    text = str(error)
    if type(error).__name__ == "SafetensorError" and "I/O error: " in text:
        return text.split("I/O error: ", 1)[1]
    return None


def file_system_message(error: OSError, output: str | None = None) -> str:
    """``error`` as one line naming the path and what the file system said, with a remedy.
    A path that is ``output`` or a temporary file of it (written beside it, or inside it, then
    renamed) is reported as ``--output OUTPUT``."""
    path = error.filename
    if output is not None and _belongs_to_output(path, Path(output)):
        path = f"--output {output}"
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


def _belongs_to_output(filename: object, output: Path) -> bool:
    """``filename`` is ``output``, or a temporary file the command writes on its way there: a
    hidden ``.<output name>.*`` beside it, or a hidden file inside it (``.adapter_model...tmp``)."""
    if not isinstance(filename, (str, bytes, os.PathLike)):  # (a file descriptor)
        return False
    path = Path(os.fsdecode(filename))
    if path == output:
        return True
    hidden = path.name.startswith(".")
    beside = path.parent == output.parent and path.name.startswith(f".{output.name}.")
    return beside or (hidden and path.parent == output)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
