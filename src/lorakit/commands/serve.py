"""``lorakit serve``: an OpenAI-compatible server of one base model and many LoRA adapters."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping

from lorakit.commands.eval import add_quantization_option
from lorakit.errors import UserError

__all__ = ["admin_token", "build", "connection_limits", "register", "run", "server_settings"]

ADMIN_TOKEN_ENV = "LORAKIT_ADMIN_TOKEN"

log = logging.getLogger("lorakit.serve")

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a base model and LoRA adapters over an OpenAI-compatible HTTP API",
        description="Serve --model with every PEFT adapter in --adapters (one subdirectory each; "
        "the OpenAI 'model' field picks the adapter). Binds to 127.0.0.1 unless --host says otherwise.",
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model spec or local transformers directory",
    )
    parser.add_argument("--adapters", required=True, help="directory of PEFT adapter directories")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    _add_admin_options(parser)
    _add_bank_options(parser)
    _add_batch_options(parser)
    _add_connection_options(parser)
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="serve adapters whose saved base fingerprint does not match --model",
    )
    parser.add_argument("--served-model-name", default=None, help="the base model's id in the API")
    add_quantization_option(parser)
    parser.set_defaults(func=run)


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
        "--adapter-memory", default=None, help="memory budget of the adapter bank, e.g. 256MB"
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


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    """The running batch and what one request may ask."""
    group = parser.add_argument_group("batching and request limits")
    group.add_argument(
        "--max-batch", type=int, default=32, help="requests decoded together at most"
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
        "--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask"
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
        help="a request head still incomplete past this many bytes is refused "
        "(400) (default: %(default)s)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections and running requests at most; beyond, uvicorn "
        "answers 503 (default: %(default)s)",
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


def server_settings(args: argparse.Namespace, positions: int, environ=None):
    """The app's ``ServerSettings`` from ``args`` (``positions``: the model's)."""
    from lorakit.serve.app import ServerSettings

    return ServerSettings(
        model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        admin_token=admin_token(args, environ),
        max_prompt_tokens=min(args.max_prompt_tokens, positions - 1),
        max_tokens_limit=args.max_tokens_limit,
        max_positions=positions,
    )


def parse_size(text: str) -> int:
    """'256MB' -> 256000000, '1GiB' -> 1073741824, '1000' -> 1000."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UserError(f"--adapter-memory {text!r} is not a size; write e.g. 512MB or 2GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _adapter_defaults(registry) -> tuple[list[str] | str, int, dict[str, float]]:
    """(target modules, max rank, layer shares) covering every adapter of the directory, from
    the configs and safetensors headers alone (no tensor data is read); adapters that cannot be
    read are skipped with a warning and listed in the start-up summary. The layer shares
    (``pool_sizes.layer_shares``) size the bank's pools to what the adapters adapt."""
    from lorakit.serve.pool_sizes import layer_shares

    headers = registry.read_headers()
    targets: set[str] = set()
    regex, rank = False, 0
    for header in headers.values():
        config = header.config
        rank = max([rank, config.r, *config.rank_pattern.values()])
        if isinstance(config.target_modules, list):
            targets.update(config.target_modules)
        else:
            regex = True
    log.info(
        "adapters in %s: %d served (%s), %d skipped%s",
        registry.root,
        len(headers),
        ", ".join(headers) or "none",
        len(registry.skipped),
        "".join(f"\n  skipped {name}: {reason}" for name, reason in registry.skipped.items()),
    )
    shares = layer_shares(header.tensors for header in headers.values())
    return ("all-linear" if regex or not targets else sorted(targets)), (rank or 16), shares


def build(args: argparse.Namespace):
    """The FastAPI app for ``args`` (model loaded, bank allocated, adapters registered)."""
    from lorakit.models import builtin_gguf_file, load_model
    from lorakit.serve import AdapterBank, prepare_for_serving
    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry, ServedAdapters

    check_numbers(args)
    if args.quantization is not None:  # before the adapters are scanned and the model loads
        from lorakit.quantized.loading import check_quantization

        check_quantization(args.quantization, builtin_gguf_file(str(args.model)))
    registry = AdapterRegistry(args.adapters)
    targets, max_rank, shares = _adapter_defaults(registry)
    if args.target_modules:
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    model, tokenizer = load_model(args.model, progress=False, quantization=args.quantization)
    try:
        prepare_for_serving(model, targets)
    except (ValueError, TypeError) as error:  # no match, or a module lorakit cannot adapt
        raise UserError(f"--target-modules: {error}") from None
    budget = parse_size(args.adapter_memory) if args.adapter_memory else None
    capacity = args.max_adapters or (None if budget else 8)
    try:
        bank = AdapterBank(
            model,
            max_rank=args.max_rank or max_rank,
            capacity=capacity,
            memory_budget=budget,
            layer_shares=shares,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    adapters = ServedAdapters(bank, registry, model, allow_base_mismatch=args.allow_base_mismatch)
    engine = Engine(
        model,
        bank,
        tokenizer,
        max_batch=args.max_batch,
        max_loras=args.max_loras,
        adapter_loader=adapters.read,
        max_waiting=args.max_waiting,
    )
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    return create_app(engine, adapters, tokenizer, server_settings(args, positions))


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
    """``UserError`` naming the first option out of range: ``POSITIVE_OPTIONS`` below 1, a
    ``--port`` outside 0-65535."""
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0-65535, got {args.port}")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lorakit serve: warning: listening on {args.host}, reachable from other machines")
    check_numbers(args)  # these three before the model loads
    limits = connection_limits(args)
    _check_port(args.host, args.port)
    uvicorn.run(
        build(args), host=args.host, port=args.port, log_level="info", **limits.uvicorn_options()
    )
    return 0


def _check_port(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go, so that a busy port is reported at once, not
    after the model has loaded."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise UserError(f"--host {host}: {error.strerror or error}") from None
    with probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
        except OSError as error:
            raise UserError(
                f"cannot listen on {host}:{port} ({error.strerror or error}); stop the program "
                "using that port or pass another --port"
            ) from None
