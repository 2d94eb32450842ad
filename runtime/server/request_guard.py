"""What every request passes before a route sees it (plain ASGI: streams are not buffered).

- While draining or after an engine failure (lifecycle.py): readiness probes answer 503,
  new requests get 503 with `Connection: close`; requests already in are counted, so the
  drain knows when the last one is done.
- The body is read with a byte limit (`--max-request-body-bytes`): a declared
  Content-Length over it is a 413 before a byte is read, a chunked body is cut off at the
  limit. Nothing large is ever parsed, tokenized or held in memory.
- A JSON body with a lone UTF-16 surrogate ("\\ud800" with no partner) is a 400: Python
  accepts such strings, tokenizers fail on them with a TypeError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pinnace.runtime.server.errors import error_response
from pinnace.runtime.server.lifecycle import Lifecycle

READINESS_PATHS = frozenset({"/health", "/v2/health/ready"})
# Answered even while draining: liveness and metrics scrapes are not "new work".
ALWAYS_OPEN = frozenset({"/", "/metrics", "/v2/health/live"})
# Any surrogate, high or low, escaped ("\ud800") or as UTF-8 bytes (ED A0..BF xx, which
# json.loads decodes with "surrogatepass"): only then is the body decoded and walked.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")

MIB = 2**20
MIN_BODY_LIMIT = 16 * MIB
BODY_BYTES_PER_TOKEN = 64  # JSON of a token: a few characters, escaped up to 12 bytes each


def default_max_body_bytes(max_model_len: int) -> int:
    """Room for a prompt of `max_model_len` tokens sent as escaped JSON text, at least 16 MiB."""
    return max(MIN_BODY_LIMIT, BODY_BYTES_PER_TOKEN * max_model_len)


class BodyTooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}.")
        self.app = app
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        path, life = scope["path"], self.lifecycle
        if not life.ready:
            reason = f"the engine failed: {life.fatal}" if life.fatal else "shutting down"
            status = 503
            if path not in READINESS_PATHS:
                reason = f"the server is not accepting requests ({reason})."
            headers = {"Connection": "close"}
            await error_response(path, status, reason, headers=headers)(scope, receive, send)
            return
        life.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            life.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        try:
            if declared is not None and declared > limit:
                raise BodyTooLarge
            body = await _read_body(receive, limit)
        except BodyTooLarge:
            message = (
                f"the request body is larger than {limit} bytes (the server's "
                "--max-request-body-bytes)."
            )
            too_large = error_response(path, 413, message, headers={"Connection": "close"})
            await too_large(scope, receive, send)
            return
        where = lone_surrogate(body)
        if where is not None:
            message = f"invalid Unicode in {where}: a lone UTF-16 surrogate (not a character)."
            await error_response(path, 400, message, where)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers") or []:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then whatever comes next (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def lone_surrogate(body: bytes) -> str | None:
    """Where a JSON body holds a string with a lone surrogate ("messages[0].content"), or
    None. Bodies that are not JSON are left to their route."""
    if not _SURROGATE.search(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    for where, text in _strings(doc):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # The path may hold the surrogate itself (a key): make it printable.
            return (where or "the body").encode("utf-8", "backslashreplace").decode()
    return None


def _strings(doc: Any) -> Iterator[tuple[str, str]]:
    """Every string (keys included) with its path; iterative, so depth costs no stack."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            yield where, node
        elif isinstance(node, dict):
            for key, value in node.items():
                yield where, key
                stack.append((f"{where}.{key}" if where else key, value))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
