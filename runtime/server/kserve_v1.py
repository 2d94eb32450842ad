"""KServe V1: `GET /` liveness and `POST /v1/models/{name}:predict` with prompts as instances.

`GET /v1/models/{name}` (the V1 readiness check) is served by the OpenAI routes: its body
is OpenAI's model object plus V1's `name` and `ready`, so both clients can read it.
`GET /v1/models` keeps the OpenAI list shape.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from pinnace.runtime.server.errors import APIError
from pinnace.runtime.server.kserve_inputs import engine_request, parse_options
from pinnace.runtime.server.kserve_protocol import V1Instance, V1PredictRequest, V1PredictResponse
from pinnace.runtime.server.serving import ServerContext, cancel_on_disconnect


def build_v1_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(tags=["kserve-v1"])

    @router.get("/")
    async def live() -> JSONResponse:
        # KServe's V1 liveness check (its SDK's is_server_live reads `status`).
        return JSONResponse({"status": "alive"})

    @router.post("/v1/models/{name:path}:predict")
    async def predict(name: str, body: V1PredictRequest, raw: Request) -> Response:
        name = ctx.resolve_model(name)
        if not body.instances:
            raise APIError(400, "instances must not be empty.", "instances")
        request_id = ctx.new_id("predict")
        requests = []
        for i, instance in enumerate(body.instances):
            prompt, values = _instance(instance, body.parameters)
            options = parse_options(values, f"instances[{i}]")
            where = f"instances[{i}]"
            request = await asyncio.to_thread(  # tokenizing: off the event loop
                engine_request, ctx, f"{request_id}-{i}", prompt, options, where, name
            )
            requests.append(request)
        ctx.check_room(len(requests))
        finals = await cancel_on_disconnect(raw, ctx.collect(requests))
        if isinstance(finals, Response):
            return finals
        predictions = [f.outputs[0].text for f in finals]
        return JSONResponse(V1PredictResponse(predictions=predictions).model_dump())

    return router


def _instance(
    instance: str | V1Instance, parameters: dict[str, object] | None
) -> tuple[str, dict[str, object]]:
    """(prompt, settings): an instance's own settings override the request's."""
    values = dict(parameters or {})
    if isinstance(instance, str):
        return instance, values
    values.update(instance.model_extra or {})
    return instance.prompt, values
