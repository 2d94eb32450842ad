"""Bearer-token auth as plain ASGI middleware (it must not buffer streamed responses)."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from pinnace.runtime.server.errors import error_response

# Probes and scrapers can't be expected to hold the key.
OPEN_PATHS = frozenset({"/", "/health", "/metrics", "/v2/health/live", "/v2/health/ready"})


class APIKeyMiddleware:
    """With an API key set, every route but health and metrics needs `Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty.")
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if given
            else "Missing API key: send the header 'Authorization: Bearer <key>'."
        )
        response = error_response(
            scope["path"], 401, message, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)
