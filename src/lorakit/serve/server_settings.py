"""``ServerSettings``: the HTTP server's settings (``lorakit.serve.app``, its admin routes
``lorakit.serve.admin_routes``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """``model_name``: the id of the base model; limits on prompts, outputs and bodies."""

    model_name: str
    admin_token: str | None = None
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512
    max_positions: int = 2048
    max_body_bytes: int = 1 << 20
