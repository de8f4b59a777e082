"""``lorakit serve`` past one machine: the engine as a Ray Serve deployment with model
multiplexing (``pip install 'lorakit[ray]'``; this module is imported only when used).

    from lorakit.serve.ray_deployment import build_app
    serve.run(build_app(model="...", adapters="./adapters", replicas=2, adapters_per_replica=16))

Two deployments: ``OpenAIIngress`` (one replica, the HTTP routes of lorakit's OpenAI-compatible
API) reads the request's ``model`` field and forwards the request to a ``LorakitReplica`` with
``multiplexed_model_id=model``, so Ray Serve sends requests for an adapter to the replicas that
already hold it (``@serve.multiplexed``, ``serve.get_multiplexed_model_id``). Each replica runs a
whole lorakit server in-process (the same app as ``lorakit serve``, so answers are the same):
its multiplexed cache of at most ``adapters_per_replica`` adapters is pinned in its bank; when
Ray evicts one from the cache, it is unpinned (the bank's LRU may then reuse its pages), so the
bank needs a slot beyond them (``--max-adapters`` at least ``adapters_per_replica + 1``).
The application may be served under any ``route_prefix`` (the prefix is taken off the path the
replica's app sees), and the ingress's own errors (404, 405) are OpenAI's JSON error object.
Responses are streamed from the replica to the client as the replica's app sends them (Ray
Serve's streaming handles), so ``stream: true`` gives server-sent events token by token, and a
client that leaves cancels its request in the replica's engine. The answer keeps the app's status
and headers (a 429's ``Retry-After``), and an adapter that fails to load is reported by the app,
as by one server (its JSON error, e.g. 400 for an adapter of other base weights).
"""

import argparse
import asyncio
import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from starlette.datastructures import Headers

from lorakit.errors import UserError
from lorakit.serve.app import install_error_handlers
from lorakit.serve.asgi_stream import ResponseStart, asgi_stream

__all__ = ["BankTooSmallError", "OpenAIIngress", "build_app", "replica_deployment"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-lorakit-replica"

# Headers about the connection or the body's framing, which the ingress's own response sets.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade content-length".split()
)


class BankTooSmallError(UserError, ValueError):
    """``--max-adapters`` leaves a replica's bank no slot beyond its pinned multiplexed cache."""


class _Resident:
    """One adapter in a replica's multiplexed cache: pinned in the bank until Ray evicts it
    from the cache (Ray calls ``__del__`` then; later calls, e.g. the garbage collector's, do
    nothing, so that they never unpin a newer load of the same adapter)."""

    def __init__(self, bank, name: str) -> None:
        self.bank, self.name, self.unpinned = bank, name, False

    def __del__(self) -> None:
        if not self.unpinned:
            self.unpinned = True
            self.bank.unpin(self.name)


def replica_deployment(adapters_per_replica: int):
    """The ``LorakitReplica`` deployment, its multiplexed cache holding ``adapters_per_replica``
    adapters at most (the decorator takes the bound when the class is defined)."""

    @serve.deployment
    class LorakitReplica:
        """A lorakit server (``commands.serve.build``) answering what the ingress forwards."""

        def __init__(self, serve_args: list[str]) -> None:
            from lorakit.cli import build_parser
            from lorakit.commands.serve import build

            self.app = build(build_parser().parse_args(["serve", *serve_args]))
            self.app.state.engine.start()  # (the app's lifespan does not run in-process)
            self.adapters = self.app.state.adapters

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def adapter(self, name: str) -> _Resident:
            await asyncio.to_thread(self.adapters.ensure_loaded, name)
            self.adapters.bank.pin(name)
            return _Resident(self.adapters.bank, name)

        async def forward(self, method: str, path: str, body: bytes, headers: dict):
            """lorakit's app on the request, as it answers: first (status, the response's raw
            headers, this replica's id), then the body's chunks (bytes)."""
            await self._hold_requested_adapter()
            replica = serve.get_replica_context().replica_id.unique_id
            app, sent_headers = _keeping_response_headers(self.app)
            async for piece in asgi_stream(app, method, path, body, headers):
                if isinstance(piece, ResponseStart):
                    yield piece.status, sent_headers, replica
                else:
                    yield piece

        async def _hold_requested_adapter(self) -> None:
            """Load and pin the request's adapter through the multiplexed cache. A failed load
            (other base weights, damaged files, a full bank) is left to the app, which loads
            it again and answers as one server does (its JSON error, or a wait for a slot)."""
            name = serve.get_multiplexed_model_id()
            if not name or name not in self.adapters.registry:
                return
            try:
                await self.adapter(name)
            except Exception:
                log.debug("adapter %r not held in the multiplexed cache", name, exc_info=True)

        def resident(self) -> list[str]:
            """The adapters of this replica's multiplexed cache (pinned in its bank)."""
            return sorted(self.adapters.bank.pinned())

    return LorakitReplica


def _keeping_response_headers(app):
    """``app`` wrapped to keep the raw headers of its response start, and the list that gets
    them (``asgi_stream`` hands on only the status and content type)."""
    sent_headers: list[tuple[bytes, bytes]] = []

    async def wrapped(scope, receive, send) -> None:
        async def keep_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent_headers.extend(message.get("headers", []))
            await send(message)

        await app(scope, receive, keep_headers)

    return wrapped, sent_headers


def _ingress_headers(replica_headers: list[tuple[bytes, bytes]], replica: str) -> Headers:
    """The replica's response headers less the hop-by-hop ones, plus the answering replica's
    id (a ``Headers``, so that repeated names stay repeated)."""
    kept = [(key, value) for key, value in replica_headers if key.lower() not in HOP_BY_HOP]
    return Headers(raw=[*kept, (REPLICA_HEADER.encode(), replica.encode())])


def _app_path(scope: dict) -> str:
    """The request's path as the replica's app routes it: without the application's route
    prefix, which Ray Serve passes as the ASGI ``root_path`` and keeps at the start of
    ``path`` (``/lk/v1/models`` under ``route_prefix="/lk"`` is ``/v1/models``)."""
    path, prefix = scope["path"], scope.get("root_path", "").rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path


ingress_app = FastAPI(title="lorakit (Ray Serve)")
# The ingress's own errors (a route it does not have: 404, 405) are OpenAI's JSON error object,
# as from one server.
install_error_handlers(ingress_app)


@serve.deployment
@serve.ingress(ingress_app)
class OpenAIIngress:
    """The HTTP side: requests routed to the replicas by their ``model`` (the adapter)."""

    def __init__(self, replica) -> None:
        self.replica = replica

    @staticmethod
    async def model_of(request: Request) -> str:
        """The body's ``model`` field ("" when absent or the body is not one lorakit's app
        accepts, e.g. not JSON or nested too deeply: the replica's app then answers its 400),
        read as the app reads it (``request_body.parse_body``)."""
        from lorakit.serve.protocol import APIError
        from lorakit.serve.request_body import parse_body

        try:
            model = parse_body(await request.body()).get("model")
        except APIError:
            return ""
        return model if isinstance(model, str) else ""

    async def _forward(self, request: Request, model: str) -> Response:
        headers = {
            k: v for k, v in request.headers.items() if k in ("authorization", "content-type")
        }
        handle = self.replica.options(stream=True)
        if model:
            handle = handle.options(multiplexed_model_id=model)
        pieces = handle.forward.remote(
            request.method, _app_path(request.scope), await request.body(), headers
        )
        status, replica_headers, replica = await anext(pieces)
        return StreamingResponse(
            pieces, status_code=status, headers=_ingress_headers(replica_headers, replica)
        )

    @ingress_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, await self.model_of(request))

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, await self.model_of(request))

    @ingress_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._forward(request, "")

    @ingress_app.get("/health")
    async def health(self, request: Request) -> Response:
        return await self._forward(request, "")


def build_app(
    serve_args: Sequence[str] | None = None,
    *,
    model: str | None = None,
    adapters: str | None = None,
    replicas: int = 2,
    adapters_per_replica: int = 16,
    replica_cpus: float = 1.0,
):
    """The Ray Serve application: ``serve.run(build_app(...))``. ``serve_args``: the options of
    ``lorakit serve`` for every replica, as a list of strings (``["--model", M, "--adapters",
    DIR, "--max-rank", "16"]``), or ``model`` and ``adapters`` alone. A replica's bank holds
    ``--max-adapters`` adapters (default ``adapters_per_replica + 2``): the multiplexed ones,
    pinned, and at least one more slot (``BankTooSmallError`` when it has none)."""
    serve_args = _argument_list(serve_args)
    if isinstance(adapters_per_replica, bool) or not isinstance(adapters_per_replica, int):
        raise TypeError(f"adapters_per_replica must be an int, got {adapters_per_replica!r}")
    if adapters_per_replica < 1:
        raise BankTooSmallError(
            f"adapters_per_replica must be >= 1, got {adapters_per_replica}: a replica pins "
            "every adapter of its multiplexed cache in a bank of fixed size, so Ray's -1 (no "
            "limit) would fill it for good"
        )
    if model is not None:
        serve_args += ["--model", model]
    if adapters is not None:
        serve_args += ["--adapters", adapters]
    options = _serve_options(serve_args)
    if options.max_adapters is None:
        serve_args += ["--max-adapters", str(adapters_per_replica + 2)]
    else:
        _check_bank_size(options.max_adapters, adapters_per_replica)
    per_replica = _requests_per_replica(options)
    replica = (
        replica_deployment(adapters_per_replica)
        .options(
            num_replicas=replicas,
            max_ongoing_requests=per_replica,
            ray_actor_options={"num_cpus": replica_cpus},
        )
        .bind(serve_args)
    )
    return OpenAIIngress.options(
        max_ongoing_requests=replicas * per_replica, ray_actor_options={"num_cpus": 0}
    ).bind(replica)


def _argument_list(serve_args: Sequence[str] | None) -> list[str]:
    """``serve_args`` as a new list; ``TypeError`` for anything but a list or tuple of strings
    (an ``argparse.Namespace`` cannot be turned back into the options a replica parses)."""
    if serve_args is None:
        return []
    if not isinstance(serve_args, list | tuple) or not all(
        isinstance(arg, str) for arg in serve_args
    ):
        raise TypeError(
            f"build_app: serve_args must be the options of 'lorakit serve' as a list of "
            f"strings, e.g. ['--model', MODEL, '--adapters', DIR], not "
            f"{type(serve_args).__name__}; pass the command line itself, not its parsed result"
        )
    return list(serve_args)


def _serve_options(serve_args: list[str]) -> argparse.Namespace:
    """``serve_args`` parsed by ``lorakit serve``'s own parser (as every replica parses them,
    so an abbreviation such as ``--max-adapt 40`` reads as it does there)."""
    from lorakit.cli import build_parser

    return build_parser().parse_args(["serve", *serve_args])


def _check_bank_size(max_adapters: int, adapters_per_replica: int) -> None:
    """Refuse a bank of ``max_adapters`` slots that the ``adapters_per_replica`` pinned
    multiplexed adapters would fill: adapters beyond them would never get a slot (503 for
    ever), since Ray unpins one only when its own cache, of ``adapters_per_replica``, is full."""
    if max_adapters < 1:
        raise BankTooSmallError(f"--max-adapters must be >= 1, got {max_adapters}")
    if max_adapters < adapters_per_replica + 1:
        lower = (
            f", or lower adapters_per_replica to {max_adapters - 1} at most"
            if max_adapters >= 2
            else ""
        )
        raise BankTooSmallError(
            f"--max-adapters {max_adapters} leaves no bank slot beyond the "
            f"adapters_per_replica={adapters_per_replica} adapters each replica pins: set "
            f"--max-adapters to at least {adapters_per_replica + 1} (leave it out for "
            f"{adapters_per_replica + 2}){lower}"
        )


def _requests_per_replica(options: argparse.Namespace) -> int:
    """Requests in flight to one replica: one more than its engine takes at once
    (``--max-batch`` running plus ``--max-waiting`` queued), so that a full replica answers the
    extra request with its own 429 and ``Retry-After`` instead of Ray queueing it. Ray Serve's
    own default of 5 per replica capped the batch, and the ingress's the whole cluster, at 5."""
    return options.max_batch + options.max_waiting + 1
