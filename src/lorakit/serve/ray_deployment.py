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
Ray evicts one from the cache, it is unpinned (the bank's LRU may then reuse its pages).
Responses are streamed from the replica to the client as the replica's app sends them (Ray
Serve's streaming handles), so ``stream: true`` gives server-sent events token by token, and a
client that leaves cancels its request in the replica's engine.
"""

import argparse
import asyncio

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve

from lorakit.serve.asgi_stream import ResponseStart, asgi_stream

__all__ = ["OpenAIIngress", "build_app", "replica_deployment"]

REPLICA_HEADER = "x-lorakit-replica"


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
            """lorakit's app on the request, as it answers: first (status, content type, this
            replica's id), then the body's chunks (bytes)."""
            name = serve.get_multiplexed_model_id()
            if name and name in self.adapters.registry:
                await self.adapter(name)
            replica = serve.get_replica_context().replica_id.unique_id
            async for piece in asgi_stream(self.app, method, path, body, headers):
                if isinstance(piece, ResponseStart):
                    yield piece.status, piece.content_type, replica
                else:
                    yield piece

        def resident(self) -> list[str]:
            """The adapters of this replica's multiplexed cache (pinned in its bank)."""
            return sorted(self.adapters.bank.pinned())

    return LorakitReplica


ingress_app = FastAPI(title="lorakit (Ray Serve)")


@serve.deployment
@serve.ingress(ingress_app)
class OpenAIIngress:
    """The HTTP side: requests routed to the replicas by their ``model`` (the adapter)."""

    def __init__(self, replica) -> None:
        self.replica = replica

    @staticmethod
    async def model_of(request: Request) -> str:
        """The body's ``model`` field ("" when absent or unreadable: lorakit's app answers 400)."""
        try:
            model = (await request.json()).get("model")
        except (ValueError, AttributeError):
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
            request.method, request.url.path, await request.body(), headers
        )
        status, media_type, replica = await anext(pieces)
        return StreamingResponse(
            pieces,
            status_code=status,
            media_type=media_type,
            headers={REPLICA_HEADER: replica},  # which replica answered
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
    serve_args: list[str] | argparse.Namespace | None = None,
    *,
    model: str | None = None,
    adapters: str | None = None,
    replicas: int = 2,
    adapters_per_replica: int = 16,
    replica_cpus: float = 1.0,
):
    """The Ray Serve application: ``serve.run(build_app(...))``. ``serve_args``: the options of
    ``lorakit serve`` for every replica (``--model``, ``--adapters``, ``--max-rank``...), or
    ``model`` and ``adapters`` alone; the bank holds the multiplexed adapters plus two."""
    serve_args = list(serve_args or [])
    if model is not None:
        serve_args += ["--model", model]
    if adapters is not None:
        serve_args += ["--adapters", adapters]
    if "--max-adapters" not in serve_args:
        serve_args += ["--max-adapters", str(adapters_per_replica + 2)]
    replica = (
        replica_deployment(adapters_per_replica)
        .options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus})
        .bind(serve_args)
    )
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(replica)
