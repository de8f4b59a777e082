"""``lorakit serve``: an OpenAI-compatible server of one base model and many LoRA adapters."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from lorakit.commands._model_options import (
    add_bnb_cpu_kernel_option,
    add_dtype_option,
    add_quantization_option,
    apply_bnb_cpu_kernel,
    check_bnb_cpu_kernel,
    torch_dtype,
)
from lorakit.commands._serve_options import (
    add_option_groups,
    admin_token,
    check_adapters_directory,
    check_numbers,
    connection_limits,
    parse_size,
)
from lorakit.errors import UserError

__all__ = ["build", "register", "run", "server_settings"]

log = logging.getLogger("lorakit.serve")


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
        help="model spec or local transformers directory (default: %(default)s)",
    )
    parser.add_argument("--adapters", required=True, help="directory of PEFT adapter directories")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    add_option_groups(parser)
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="serve adapters whose saved base fingerprint does not match --model",
    )
    parser.add_argument("--served-model-name", default=None, help="the base model's id in the API")
    add_quantization_option(parser)
    add_bnb_cpu_kernel_option(parser)
    add_dtype_option(parser)
    parser.set_defaults(func=run)


_READ_TOKEN = object()  # server_settings: read the admin token from args and environ


def server_settings(
    args: argparse.Namespace, positions: int, environ=None, *, token: object = _READ_TOKEN
):
    """The app's ``ServerSettings`` from ``args`` (``positions``: the model's; ``token``: the
    admin token ``admin_token`` already read, by default read here)."""
    from lorakit.serve.app import ServerSettings

    if token is _READ_TOKEN:
        token = admin_token(args, environ)
    return ServerSettings(
        model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
        admin_token=token,
        max_prompt_tokens=min(args.max_prompt_tokens, positions - 1),
        max_tokens_limit=args.max_tokens_limit,
        max_positions=positions,
    )


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
    from lorakit.serve.pool_sizes import BudgetTooSmall
    from lorakit.serve.registry import AdapterRegistry, ServedAdapters

    check_numbers(args)
    check_adapters_directory(args.adapters)
    token = admin_token(args)  # a bad --admin-token-file: reported before the model loads
    if args.quantization is not None:  # before the adapters are scanned and the model loads
        from lorakit.quantized.loading import check_quantization

        check_quantization(args.quantization, builtin_gguf_file(str(args.model)))
    check_bnb_cpu_kernel(args)
    registry = AdapterRegistry(args.adapters)
    targets, max_rank, shares = _adapter_defaults(registry)
    if args.target_modules:
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    model, tokenizer = load_model(
        args.model, progress=False, quantization=args.quantization, dtype=torch_dtype(args.dtype)
    )
    try:
        prepare_for_serving(model, targets)
    except (ValueError, TypeError) as error:  # no match, or a module lorakit cannot adapt
        raise UserError(f"--target-modules: {error}") from None
    apply_bnb_cpu_kernel(args, model)
    budget = parse_size(args.adapter_memory) if args.adapter_memory else None
    capacity = args.max_adapters or (None if budget else 8)
    try:
        bank = AdapterBank(
            model,
            max_rank=args.max_rank or max_rank,
            capacity=capacity,
            memory_budget=budget,
            layer_shares=shares,
            dtype=None if args.adapter_dtype is None else torch_dtype(args.adapter_dtype),
        )
    except BudgetTooSmall as error:
        raise UserError(
            f"--adapter-memory {args.adapter_memory} ({error.memory_budget} bytes) holds no "
            f"adapter of rank {error.max_rank}: one takes {error.adapter_bytes} bytes; raise "
            f"--adapter-memory to at least {error.adapter_bytes} or lower --max-rank"
        ) from None
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
    settings = server_settings(args, positions, token=token)
    return create_app(engine, adapters, tokenizer, settings)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lorakit serve: warning: listening on {args.host}, reachable from other machines")
    check_numbers(args)  # these three before the model loads
    limits = connection_limits(args)
    _check_port(args.host, args.port)
    app = build(args)
    _freeze_start_up_objects()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **limits.uvicorn_options())
    return 0


def _freeze_start_up_objects() -> None:
    """Move everything start-up made (the model's modules and parameters, the tokenizer: some
    hundreds of thousands of objects) out of the garbage collector's reach (``gc.freeze``):
    they live as long as the server, and each full collection of a request's garbage would
    otherwise walk them all with the GIL held (0.5-1.3 s stalls of the event loop measured)."""
    import gc

    gc.collect()
    gc.freeze()


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
