"""The HTTP error of lorakit's OpenAI-compatible server (``APIError``: a status, OpenAI's
error fields and response headers such as ``Retry-After``) and the JSON body it is answered
with (``error_body``: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body"]


class APIError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``, with
    ``headers`` (e.g. ``Retry-After``) on the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}


def error_body(error: APIError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }
