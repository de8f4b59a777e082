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
bank needs a slot beyond them (``--max-adapters`` at least ``adapters_per_replica + 1``) and,
with ``--adapter-memory``, the pages of one more adapter of the largest rank (``build_app``
checks both). An adapter joins the cache once the app has answered a request for it with
success: a request the app refuses (400, 429) pins and evicts nothing.
The application may be served under any ``route_prefix`` (the prefix is taken off the path the
replica's app sees), and the ingress's own errors (404, 405) are OpenAI's JSON error object.
Responses are streamed from the replica to the client as the replica's app sends them (Ray
Serve's streaming handles), so ``stream: true`` gives server-sent events token by token, and a
client that leaves cancels its request in the replica's engine. The answer keeps the app's status
and headers (a 429's ``Retry-After``), and an adapter that fails to load is reported by the app,
as by one server (its JSON error, e.g. 400 for an adapter of other base weights); the ingress
reads a body within the app's limit, as the app does (a larger one: the app's 413).
"""

import asyncio
import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from starlette.datastructures import Headers

from lorakit.serve.app import ServerSettings, install_error_handlers
from lorakit.serve.asgi_stream import ResponseStart, asgi_stream
from lorakit.serve.protocol import APIError
from lorakit.serve.ray_app_options import (
    argument_list,
    check_counts,
    max_body_bytes,
    requests_per_replica,
    serve_options,
)
from lorakit.serve.replica_bank import (
    BankTooSmallError,
    check_bank_memory,
    check_bank_size,
    check_replica_bank,
)
from lorakit.serve.request_body import parse_body, read_body

__all__ = ["BankTooSmallError", "OpenAIIngress", "build_app", "replica_deployment"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-lorakit-replica"

# Headers about the connection or the body's framing, which the ingress's own response sets.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade content-length".split()
)


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
            from lorakit.commands.serve import build

            options = serve_options(list(serve_args))
            self.app = build(options)
            self.adapters = self.app.state.adapters
            if options.adapter_memory is not None:  # (as build_app, which may lack the files)
                check_replica_bank(self.adapters, options, adapters_per_replica)
            self.app.state.engine.start()  # (the app's lifespan does not run in-process)

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def adapter(self, name: str) -> _Resident:
            await asyncio.to_thread(self.adapters.ensure_loaded, name)
            self.adapters.bank.pin(name)
            return _Resident(self.adapters.bank, name)

        async def forward(self, method: str, path: str, body: bytes, headers: dict):
            """lorakit's app on the request, as it answers: first (status, the response's raw
            headers, this replica's id), then the body's chunks (bytes). The app loads the
            request's adapter itself, as one server does: only once it has accepted the
            request (a valid body, a queue place); the adapter of a request it answered with
            success is then held in the multiplexed cache, pinned. A request it refused (400,
            404, 429) pins nothing and so evicts no adapter from the cache."""
            replica = serve.get_replica_context().replica_id.unique_id
            app, sent_headers = _keeping_response_headers(self.app)
            async for piece in asgi_stream(app, method, path, body, headers):
                if isinstance(piece, ResponseStart):
                    if 200 <= piece.status < 300:
                        await self._hold_requested_adapter()
                    yield piece.status, sent_headers, replica
                else:
                    yield piece

        async def _hold_requested_adapter(self) -> None:
            """Load (if evicted meanwhile) and pin the request's adapter through the
            multiplexed cache, which holds ``adapters_per_replica`` at most (Ray unpins its
            least recently used one to make room). A failed load (a full bank) is only logged:
            the answer was given; the adapter is held at its next request."""
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
    """The HTTP side: requests routed to the replicas by their ``model`` (the adapter).
    ``max_body_bytes``: the replicas' app's limit on a request body (``ServerSettings``), which
    the ingress applies as the app does before it reads or forwards more."""

    def __init__(self, replica, max_body_bytes: int = ServerSettings.max_body_bytes) -> None:
        self.replica, self.max_body_bytes = replica, max_body_bytes

    @staticmethod
    def model_of(raw: bytes) -> str:
        """The ``model`` field of the body ``raw`` (within ``max_body_bytes``: ``_body``; ""
        when absent or the body is not one lorakit's app accepts, e.g. not JSON or nested too
        deeply: the replica's app then answers its 400), read as the app reads it
        (``request_body.parse_body``)."""
        try:
            model = parse_body(raw).get("model")
        except APIError:
            return ""
        return model if isinstance(model, str) else ""

    async def _body(self, request: Request) -> bytes:
        """The request's body, read as the replicas' app reads it (``request_body.read_body``
        with its ``max_body_bytes``): a larger one is the app's 413, from its Content-Length
        before anything is read, or as soon as the bytes received pass the limit."""
        return await read_body(request, self.max_body_bytes)

    async def _forward(self, request: Request, body: bytes, model: str) -> Response:
        headers = {
            k: v for k, v in request.headers.items() if k in ("authorization", "content-type")
        }
        headers["content-length"] = str(len(body))  # (the body the replica's app reads)
        handle = self.replica.options(stream=True)
        if model:
            handle = handle.options(multiplexed_model_id=model)
        pieces = handle.forward.remote(request.method, _app_path(request.scope), body, headers)
        status, replica_headers, replica = await anext(pieces)
        return StreamingResponse(
            pieces, status_code=status, headers=_ingress_headers(replica_headers, replica)
        )

    async def _forward_by_model(self, request: Request) -> Response:
        body = await self._body(request)
        return await self._forward(request, body, self.model_of(body))

    @ingress_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward_by_model(request)

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward_by_model(request)

    @ingress_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._forward(request, await self._body(request), "")

    @ingress_app.get("/health")
    async def health(self, request: Request) -> Response:
        return await self._forward(request, await self._body(request), "")


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
    pinned, and at least one more slot (``BankTooSmallError`` when it has none); with
    ``--adapter-memory``, its pages must hold more adapters of the largest rank than the
    pinned ones too (``check_bank_memory``). ``replicas``: an int >= 1."""
    serve_args = argument_list(serve_args)
    check_counts(replicas, adapters_per_replica)
    if model is not None:
        serve_args += ["--model", model]
    if adapters is not None:
        serve_args += ["--adapters", adapters]
    options = serve_options(serve_args)
    if options.max_adapters is None:
        serve_args += ["--max-adapters", str(adapters_per_replica + 2)]
        options.max_adapters = adapters_per_replica + 2
    else:
        check_bank_size(options.max_adapters, adapters_per_replica)
    if options.adapter_memory is not None:
        check_bank_memory(options, adapters_per_replica)
    per_replica = requests_per_replica(options)
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
    ).bind(replica, max_body_bytes(options))
