"""vLLM's runtime adapter routes for ``lorakit.serve.app``: ``POST /v1/load_lora_adapter
{lora_name, lora_path}`` and ``/v1/unload_lora_adapter {lora_name}``, behind ``Authorization:
Bearer <admin token>`` (none set: both refused with a 401 saying how to set one)."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from lorakit.errors import UserError
from lorakit.serve.bank import AdapterInUseError
from lorakit.serve.protocol import APIError
from lorakit.serve.registry import AdapterNameError, ServedAdapters
from lorakit.serve.request_body import read_json
from lorakit.serve.server_settings import ServerSettings

__all__ = ["add_admin_routes"]


def add_admin_routes(app: FastAPI, adapters: ServedAdapters, settings: ServerSettings) -> None:
    """vLLM's runtime adapter routes, behind the admin bearer token."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        _check_admin(request, settings)
        body = await read_json(request, settings.max_body_bytes)
        name = _string(body, "lora_name")
        path = body.get("lora_path")
        try:
            loaded = await run_in_threadpool(adapters.add, name, path)
        except AdapterNameError as error:
            raise APIError(400, str(error), param="lora_name") from None
        except (UserError, ValueError) as error:
            raise APIError(400, str(error), param="lora_path") from None
        return {"status": "ok", "message": _added(name, loaded), "loaded": loaded}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        _check_admin(request, settings)
        body = await read_json(request, settings.max_body_bytes)
        name = _string(body, "lora_name")
        try:
            await run_in_threadpool(adapters.remove, name)
        except KeyError:
            raise APIError(
                404, f"adapter {name!r} is not loaded", param="lora_name", code="model_not_found"
            ) from None
        except AdapterInUseError as error:
            raise APIError(409, str(error), param="lora_name") from None
        return {"status": "ok", "message": f"LoRA adapter {name!r} removed"}


def _added(name: str, loaded: bool) -> str:
    """The message of a runtime load: added, and loaded now or (every slot busy) later."""
    if loaded:
        return f"LoRA adapter {name!r} added"
    return (
        f"LoRA adapter {name!r} added; every adapter slot is in use now, so it is loaded on its "
        "first request (as an adapter found at start-up)"
    )


def _check_admin(request: Request, settings: ServerSettings) -> None:
    if not settings.admin_token:
        raise APIError(
            401,
            "runtime adapter loading is disabled; start the server with an admin token "
            "($LORAKIT_ADMIN_TOKEN or --admin-token-file)",
            type="authentication_error",
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # the header as its bytes (Starlette decodes them as Latin-1), against the token's UTF-8
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("latin-1"), settings.admin_token.encode()
    ):
        raise APIError(
            401,
            "missing or wrong admin token (Authorization: Bearer <token>)",
            type="authentication_error",
        )


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"'{name}' must be a non-empty string", param=name)
    return value
