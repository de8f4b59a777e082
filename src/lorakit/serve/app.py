"""The OpenAI-compatible HTTP server (FastAPI) over the engine.

Routes: ``GET /health``, ``GET /v1/models`` (the base and every adapter), ``POST /v1/completions``
and ``/v1/chat/completions`` (``model`` = an adapter name, or the base name for none; ``stream``
as server-sent events ending with ``data: [DONE]``), and vLLM's admin routes
``POST /v1/load_lora_adapter {lora_name, lora_path}`` / ``/v1/unload_lora_adapter {lora_name}``
behind ``Authorization: Bearer <admin token>``. Every error is OpenAI's JSON error object.
A completion body may carry ``merged_adapters`` (with ``model`` = the base name): a mixture of
served adapters, combined once and served from the bank (``mixtures``; the engine's adapter
loader is wrapped so that it reads mixtures too; ``app.state.mixtures``).

Prompts are measured and tokenized in a worker thread (``prompts.prompt_ids``), never on the
event loop; a client that disconnects cancels its request and a full waiting queue is a 429
(``responses.answer``); connection timeouts are uvicorn's business (``connections``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lorakit.errors import UserError
from lorakit.serve import mixtures as mixing
from lorakit.serve import prompts, protocol, request_body, responses
from lorakit.serve.adapter_dirs import BrokenAdapterError
from lorakit.serve.admin_routes import add_admin_routes
from lorakit.serve.bank import BankFullError
from lorakit.serve.engine import Engine
from lorakit.serve.protocol import APIError
from lorakit.serve.registry import AdapterGoneError, ServedAdapters
from lorakit.serve.sampling import InvalidSamplingParam
from lorakit.serve.server_settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "install_error_handlers"]

log = logging.getLogger(__name__)


def create_app(
    engine: Engine, adapters: ServedAdapters, tokenizer, settings: ServerSettings
) -> FastAPI:
    """The app; starting it starts the engine thread, shutting it down stops the engine."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    adapters.registry.reserve(settings.model_name)  # no adapter may take the base model's name
    mixtures = mixing.Mixtures(adapters, engine.adapter_loader)
    engine.adapter_loader = mixtures.read  # a mixture evicted from the bank comes back from it
    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.engine, app.state.adapters = engine, adapters  # (serve.ray_deployment starts it)
    app.state.mixtures = mixtures
    install_error_handlers(app)
    _add_status_routes(app, engine, adapters, settings)
    _add_generation_routes(app, engine, adapters, tokenizer, settings)
    add_admin_routes(app, adapters, settings)
    return app


def _add_status_routes(
    app: FastAPI, engine: Engine, adapters: ServedAdapters, settings: ServerSettings
) -> None:
    """``/health`` (load, bank and engine counters) and ``/v1/models`` (the base and adapters)."""
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        running, waiting = engine.load
        bank = adapters.bank
        return {
            "status": "ok",
            "running": running,
            "waiting": waiting,
            "adapters_loaded": bank.loaded_count,  # lock-free: a load never stalls /health
            "adapter_capacity": bank.capacity,
            "adapter_memory_bytes": bank.memory_bytes(),
            "adapter_resident_bytes": bank.resident_bytes(),  # the pages loaded adapters hold
            "adapter_evictions": bank.evictions,
            "max_running_batch": engine.stats.max_running,
            "joined_running_batch": engine.stats.joined_running,
            "cancelled_requests": engine.stats.cancelled,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        base = {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "lorakit",
            "root": settings.model_name,
            "parent": None,
        }
        cards = [base] + [
            {**base, "id": name, "root": name, "parent": settings.model_name}
            for name in adapters.registry.names()
        ]
        return {"object": "list", "data": cards}


def _add_generation_routes(
    app: FastAPI, engine: Engine, adapters: ServedAdapters, tokenizer, settings: ServerSettings
) -> None:
    """``/v1/completions`` and ``/v1/chat/completions``: parse, pick the adapter (or mixture),
    tokenize off the event loop, answer (streamed or whole)."""
    mixtures = app.state.mixtures

    async def run_job(request: Request, chat: bool):
        body = await request_body.read_json(request, settings.max_body_bytes)
        job = protocol.parse_job(body, chat=chat, max_tokens_limit=settings.max_tokens_limit)
        prompt_ids = await run_in_threadpool(  # bounded work, but never on the event loop
            prompts.prompt_ids,
            job,
            tokenizer,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_positions=settings.max_positions,
            vocab_size=engine.vocab_size,
        )  # (before the adapter is loaded: a bad prompt evicts no other adapter)
        job = _fit_max_tokens(job, len(prompt_ids), settings.max_positions)
        # a queue place (or a 429) before an adapter load evicts another; given back on errors
        with responses.queue_place(engine) as place:
            if body.get(mixing.FIELD) is None:
                adapter = await _adapter_for(job.model, adapters, settings)
            else:
                adapter = await _mixture_for(body[mixing.FIELD], job.model, mixtures, settings)
            return await responses.answer(engine, job, prompt_ids, adapter, request.receive, place)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run_job(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run_job(request, chat=True)


def _fit_max_tokens(
    job: protocol.CompletionJob, prompt_tokens: int, max_positions: int
) -> protocol.CompletionJob:
    """``prompts.fit_max_tokens``; a 400 on ``min_tokens`` when the default ``max_tokens`` it
    shortens to the room the prompt leaves is below it."""
    try:
        return prompts.fit_max_tokens(job, prompt_tokens, max_positions)
    except InvalidSamplingParam as error:
        raise APIError(
            400,
            f"{error}: the prompt of {prompt_tokens} tokens leaves room for only "
            f"{max_positions - prompt_tokens}; ask for fewer min_tokens or send a shorter prompt",
            param=error.field,
        ) from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(
            protocol.error_body(error), status_code=error.status, headers=error.headers
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        wrapped = APIError(error.status_code, str(error.detail), code=str(error.status_code))
        return JSONResponse(  # (its headers kept: a 405's Allow)
            protocol.error_body(wrapped), status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(ClientDisconnect)
    async def client_left(_: Request, error: ClientDisconnect) -> Response:
        # The client went away (or the request timeout closed it) before its body was read:
        # nobody will read this answer (499: nginx's "client closed request").
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(protocol.error_body(APIError(400, str(error))), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        body = APIError(500, f"internal error: {type(error).__name__}", type="server_error")
        return JSONResponse(protocol.error_body(body), status_code=500)


async def _adapter_for(
    model: str, adapters: ServedAdapters, settings: ServerSettings
) -> str | None:
    if model == settings.model_name:
        return None
    try:
        served = adapters.registry.discover(model)
    except BrokenAdapterError as error:
        raise APIError(400, str(error), param="model") from None
    if not served:
        raise responses.model_not_found(model)
    try:
        await run_in_threadpool(adapters.ensure_loaded, model)
    except UserError as error:
        raise APIError(400, str(error), param="model") from None
    except BankFullError:
        pass  # every slot is busy now: the engine loads it when a running request frees one
    except AdapterGoneError as gone:
        again = (
            "it is served again once the directory is back"
            if gone.returns
            else "load it again with /v1/load_lora_adapter"
        )
        raise APIError(
            404,
            f"the model {model!r} does not exist: its directory was deleted ({again})",
            param="model",
            code="model_not_found",
        ) from None
    except KeyError:  # unloaded meanwhile
        raise responses.model_not_found(model) from None
    return model


async def _mixture_for(
    field: object, model: str, mixtures: mixing.Mixtures, settings: ServerSettings
) -> str:
    """The bank name of the requested mixture, combined (once) and loaded (``mixtures``)."""
    if model != settings.model_name:
        raise APIError(
            400,
            f"with '{mixing.FIELD}', 'model' must be the base model {settings.model_name!r} "
            f"(the adapters are named in {mixing.FIELD}.ids), got {model!r}",
            param="model",
        )
    mixture = mixing.parse_mixture(field)
    try:
        name = await run_in_threadpool(mixtures.prepare, mixture)
    except KeyError as error:  # an input unloaded between its check and its read
        raise APIError(400, f"'{mixing.FIELD}': {error}", param=mixing.FIELD) from None
    try:
        await run_in_threadpool(mixtures.adapters.bank.ensure_loaded, name, mixtures.read)
    except BankFullError:
        pass  # every slot is busy now: the engine loads it when a running request frees one
    except (UserError, KeyError) as error:  # an input replaced or unloaded meanwhile
        raise APIError(400, f"'{mixing.FIELD}': {error}", param=mixing.FIELD) from None
    return name
