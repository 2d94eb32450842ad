"""Errors are part of the interface: one exception type, two body shapes.

OpenAI routes answer vLLM's shape, `{"error": {"message", "type", "param", "code"}}`;
KServe routes (`/v2/...`, `/v1/models/{name}:predict`) answer `{"error": "..."}`.
FastAPI's 422 for an unparsable or ill-typed body becomes a 400 that names the field.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# vLLM's `type` for each status, which the openai client maps to its exception classes.
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answer: HTTP status, a message for the user and the offending parameter."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        kind: str | None = None,  # the OpenAI body's `type`; None: the status's usual one
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.kind = kind


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def unsupported(param: str, detail: str = "") -> APIError:
    """A parameter the engine does not implement: rejected, never silently ignored."""
    suffix = f" ({detail})" if detail else ""
    return APIError(400, f"{param} is not supported by this server yet{suffix}.", param)


def is_kserve_path(path: str) -> bool:
    return path.startswith("/v2") or path.endswith(":predict")


def error_body(
    path: str, status: int, message: str, param: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    if is_kserve_path(path):
        return {"error": message}
    kind = kind or _ERROR_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", ""))
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    path: str,
    status: int,
    message: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    kind: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, param, kind), status, headers=headers)


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """pydantic errors -> ("field: problem; ...", first field) for a 400 message."""
    parts: list[str] = []
    first: str | None = None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Union members add their type name to the location: keep it out of the message.
        loc = [x for x in loc if not _is_type_tag(x)]
        field = ".".join(loc)
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            parts.append(f"the request body is not valid JSON ({detail})")
            continue
        if not field and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
            parts.append(
                "the request body must be a JSON object (sent as Content-Type: application/json)"
            )
            continue
        first = first or field or None
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{field}: {msg}" if field else msg)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more problem(s)")
    return "; ".join(parts) + ".", first


def _is_type_tag(loc: str) -> bool:
    return loc in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in loc


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        path = request.url.path
        return error_response(path, exc.status, exc.message, exc.param, exc.headers, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(exc.errors()))
        return error_response(request.url.path, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}."
        return error_response(request.url.path, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # Only input reaches this deep: a JSON body nested beyond what a decoder will walk.
        message = "the request is nested too deeply to decode (thousands of levels)."
        return error_response(request.url.path, 400, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, f"internal error: {exc!r}")
