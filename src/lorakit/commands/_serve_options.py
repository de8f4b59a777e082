"""The options of ``lorakit serve`` and what they mean: the admin token, the bank, the batch and
request limits, the connection limits, and the checks of their values (``check_numbers``,
``parse_size``, ``admin_token``, ``connection_limits``), which run before the model loads.

A helper of ``lorakit.commands.serve`` (its leading underscore keeps it out of the command list:
``lorakit.cli.command_modules``); nothing heavy is imported here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

from lorakit.commands._model_options import DTYPES
from lorakit.errors import UserError

__all__ = [
    "ADMIN_TOKEN_ENV",
    "POSITIVE_OPTIONS",
    "add_option_groups",
    "admin_token",
    "check_adapters_directory",
    "check_numbers",
    "connection_limits",
    "parse_size",
]

ADMIN_TOKEN_ENV = "LORAKIT_ADMIN_TOKEN"

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def add_option_groups(parser: argparse.ArgumentParser) -> None:
    """The admin, bank, batching and connection option groups of ``lorakit serve``."""
    _add_admin_options(parser)
    _add_bank_options(parser)
    _add_batch_options(parser)
    _add_connection_options(parser)


def _add_admin_options(parser: argparse.ArgumentParser) -> None:
    """The bearer token of /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    group = parser.add_argument_group("loading adapters while serving")
    group.add_argument(
        "--admin-token-file",
        default=None,
        help="file holding the bearer token for /v1/load_lora_adapter and "
        f"/v1/unload_lora_adapter (default: ${ADMIN_TOKEN_ENV}; without a token they are "
        "disabled)",
    )
    group.add_argument(
        "--admin-token",
        default=None,
        help="the admin token itself; visible to every user in ps, so prefer "
        f"${ADMIN_TOKEN_ENV} or --admin-token-file",
    )


def _add_bank_options(parser: argparse.ArgumentParser) -> None:
    """How many adapters the bank holds, in how much memory, of which rank and layers."""
    group = parser.add_argument_group("adapter bank")
    group.add_argument(
        "--max-adapters", type=int, default=None, help="adapter slots in memory (default 8)"
    )
    group.add_argument(
        "--adapter-memory",
        default=None,
        help="memory budget of the adapter bank's pages and scalings, e.g. 256MB; the gain "
        "tables of DoRA adapters come on top, outside it (docs/serving.md)",
    )
    group.add_argument(
        "--max-rank",
        type=int,
        default=None,
        help="largest adapter rank (default: the largest in --adapters, else 16)",
    )
    group.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated modules to route (default: the union of the adapters' targets)",
    )
    group.add_argument(
        "--adapter-dtype",
        choices=DTYPES,
        default=None,
        help="dtype the bank holds adapters in: bfloat16 or float16 hold twice the adapters of "
        "float32 in the same --adapter-memory and read half the bytes a step; each adapter is "
        "rounded once when loaded, the products stay float32 (default: float32, float64 on a "
        "float64 base)",
    )


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    """The running batch and what one request may ask."""
    group = parser.add_argument_group("batching and request limits")
    group.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="requests decoded together at most (default: %(default)s)",
    )
    group.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="distinct adapters decoded together at most (as vLLM's --max-loras: requests for "
        "other adapters wait their turn while those behind them go ahead; default: no bound)",
    )
    group.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=1024,
        help="longest prompt accepted, in tokens; at most the model's positions - 1; "
        "a text over 32 characters a token is refused before it is tokenized "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-tokens-limit",
        type=int,
        default=512,
        help="largest max_tokens a request may ask (default: %(default)s)",
    )
    group.add_argument(
        "--max-waiting",
        type=int,
        default=128,
        help="requests queued for the running batch at most; more are answered "
        "429 with Retry-After (default: %(default)s)",
    )


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    # The defaults of serve.connections.ConnectionLimits (not imported here: uvicorn is heavy
    # for every other command; a test checks they agree).
    group = parser.add_argument_group("connection limits")
    group.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle connection stays open after a response (default: %(default)s)",
    )
    group.add_argument(
        "--timeout-request",
        type=float,
        default=30.0,
        help="seconds a client has to send a whole request (head and body) after "
        "connecting or after its previous response; silent or slower connections "
        "are closed (default: %(default)s)",
    )
    group.add_argument(
        "--max-header-bytes",
        type=int,
        default=16384,
        help="the longest request head (request line and headers) in bytes; a longer "
        "one is answered 400 and its connection closed (default: %(default)s)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="connections served at once, idle keep-alive ones included (>= 1): a request "
        "is answered 503, and its connection closed, while this many connections opened "
        "before its own are open; the older ones go on (default: %(default)s)",
    )
    group.add_argument(
        "--backlog",
        type=int,
        default=256,
        help="connections queued by the kernel before they are accepted (default: %(default)s)",
    )


def admin_token(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token: from ``--admin-token-file``, else ``--admin-token`` (with a warning on
    stderr: the command line shows in ps), else ``$LORAKIT_ADMIN_TOKEN``; None: admin routes
    disabled. Surrounding whitespace (a file's newline) is dropped."""
    environ = os.environ if environ is None else environ
    if args.admin_token_file and args.admin_token:
        raise UserError("give --admin-token-file or --admin-token, not both")
    if args.admin_token_file:
        try:
            with open(args.admin_token_file, encoding="utf-8") as file:
                token = file.read(64 * 1024).strip()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--admin-token-file {args.admin_token_file}: {error}") from None
        if not token:
            raise UserError(f"--admin-token-file {args.admin_token_file} is empty")
        return token
    if args.admin_token:
        print(
            "lorakit serve: warning: --admin-token on the command line is visible to other "
            f"users (ps); set ${ADMIN_TOKEN_ENV} or use --admin-token-file instead",
            file=sys.stderr,
        )
        return args.admin_token.strip() or None
    return environ.get(ADMIN_TOKEN_ENV, "").strip() or None


def connection_limits(args: argparse.Namespace):
    """The ``ConnectionLimits`` of ``args`` (``UserError`` for a value out of range)."""
    from lorakit.serve.connections import ConnectionLimits

    try:
        return ConnectionLimits(
            timeout_keep_alive=args.timeout_keep_alive,
            timeout_request=args.timeout_request,
            max_header_bytes=args.max_header_bytes,
            max_connections=args.max_connections,
            backlog=args.backlog,
        )
    except ValueError as error:
        option = "--" + str(error).split(" ", 1)[0].replace("_", "-")
        raise UserError(f"{option}: {error}") from None


def parse_size(text: str) -> int:
    """'256MB' -> 256000000, '1GiB' -> 1073741824, '1000' -> 1000."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UserError(f"--adapter-memory {text!r} is not a size; write e.g. 512MB or 2GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


POSITIVE_OPTIONS = (
    "max_batch",
    "max_loras",
    "max_waiting",
    "max_prompt_tokens",
    "max_tokens_limit",
    "max_adapters",
    "max_rank",
)
"""The options that must be >= 1 where given (0 would start a server that refuses or holds
every request, or fall back to the default unseen)."""


def check_numbers(args: argparse.Namespace) -> None:
    """``UserError`` naming the first option out of range: ``POSITIVE_OPTIONS`` below 1, an
    ``--adapter-memory`` that is not a size or is under one byte, a ``--port`` outside
    0-65535."""
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    memory = getattr(args, "adapter_memory", None)
    if memory is not None and parse_size(memory) < 1:
        raise UserError(f"--adapter-memory {memory!r} is under one byte; write e.g. 512MB")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0-65535, got {args.port}")


def check_adapters_directory(adapters: str) -> None:
    """``UserError`` for an ``--adapters`` that is not a directory holding adapters: empty
    (``refuse_empty``), a file, or one adapter's own directory (it holds
    ``adapter_config.json``; only its subdirectories would be looked at, so nothing would be
    served). A missing directory is ``AdapterRegistry``'s to report."""
    from pathlib import Path

    from lorakit.commands.extract import refuse_empty

    wanted = "the directory holding the adapters, one subdirectory each"
    refuse_empty("--adapters", adapters, f"give {wanted}")
    path = Path(adapters)
    if path.is_file():
        raise UserError(f"--adapters {adapters} is a file; give {wanted}")
    if (path / "adapter_config.json").is_file():
        above = path.resolve().parent
        raise UserError(
            f"--adapters {adapters} is an adapter directory (it holds adapter_config.json); "
            f"--adapters takes {wanted} (named by it): give {above} to serve it as "
            f"{path.resolve().name!r}, or a directory you copy or link it into"
        )
