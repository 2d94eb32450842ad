"""KServe V2 / Open Inference Protocol routes, plus Triton's generate extension.

`{name}` may carry a version (`<model>/versions/1`, as in the spec's paths); the one
version served is "1". Errors answer `{"error": "..."}` (see errors.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.responses import Response

from pinnace.runtime.engine.async_engine import EngineDeadError
from pinnace.runtime.server.deltas import DeltaTracker, stream_deltas
from pinnace.runtime.server.errors import APIError, bad_request, describe_validation_errors
from pinnace.runtime.server.kserve_binary import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    attach_binary_inputs,
    binary_response,
    encode_bytes_tensor,
    read_body,
    split_body,
    wants_binary_output,
)
from pinnace.runtime.server.kserve_inputs import KServeOptions, engine_request, parse_options
from pinnace.runtime.server.kserve_protocol import (
    TEXT_INPUT,
    TEXT_OUTPUT,
    V2GenerateRequest,
    V2GenerateResponse,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2ResponseOutput,
    V2ServerMetadata,
    V2TensorMetadata,
)
from pinnace.runtime.server.logprobs import prompt_logprobs_of
from pinnace.runtime.server.serving import (
    MODEL_VERSION,
    EngineRequest,
    ServerContext,
    cancel_on_disconnect,
    server_version,
    sse,
    sse_error,
)

PLATFORM = "pinnace"
# This server's extensions (gRPC reports the same server; generate is on REST only).
EXTENSIONS = ["binary_tensor_data", "generate"]


def _json(model: Any, status: int = 200) -> JSONResponse:
    # The spec's optional fields may be absent but never null.
    return JSONResponse(model.model_dump(exclude_none=True), status)


def resolve(ctx: ServerContext, name: str) -> tuple[str, str | None]:
    """(model name, version or None) of a path's `{name}`; 404 if not served."""
    model, sep, version = name.partition("/versions/")
    return ctx.resolve_model(model, version if sep else None), version if sep else None


def parse_infer_request(header: Any) -> V2InferRequest:
    """The JSON header of an infer request, validated; 400 naming the bad field."""
    if not isinstance(header, dict):
        raise bad_request("the infer request must be a JSON object.")
    try:
        return V2InferRequest.model_validate(header)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()))
        raise bad_request(message, param) from exc


async def read_infer_body(raw: Request) -> V2InferRequest:
    """A REST infer request's body, validated: read by hand rather than as a pydantic body
    because the binary extension puts raw bytes after the JSON, and clients send JSON with
    any content type (Triton's with none). 413 past MAX_BODY_BYTES, 400 naming a bad field."""
    data = await read_body(raw.stream(), raw.headers.get("content-length"))
    header, binary = split_body(data, raw.headers.get(HEADER_LENGTH))
    attach_binary_inputs(header, binary)
    return parse_infer_request(header)


def infer_requests(
    ctx: ServerContext, body: V2InferRequest, model: str
) -> tuple[list[EngineRequest], list[int], bool]:
    """(engine requests, output shape, whether text_output is wanted as binary) of a
    V2 infer request; REST and gRPC share it."""
    settings = dict(body.parameters or {})
    requested = body.outputs[0].parameters if body.outputs else None
    as_binary = wants_binary_output(settings, requested)
    settings.pop("binary_data_output", None)
    options = parse_options(settings)
    prompts, shape = text_prompts(body)
    requests = _engine_requests(ctx, "infer", prompts, options, model)
    ctx.check_room(len(requests))
    return requests, shape, as_binary


def text_prompts(req: V2InferRequest) -> tuple[list[str], list[int]]:
    """The prompts of a BYTES `text_input` tensor, and its shape."""
    names = [t.name for t in req.inputs]
    if names != [TEXT_INPUT]:
        raise bad_request(f"expected one input tensor named {TEXT_INPUT!r}, got {names}.")
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise bad_request(f"{TEXT_INPUT} must have datatype BYTES, got {tensor.datatype!r}.")
    extra = set(tensor.parameters or {}) - {"content_type"}
    if extra or (tensor.parameters or {}).get("content_type", "str") != "str":
        raise bad_request(f"{TEXT_INPUT} parameters {tensor.parameters} are not supported.")
    prompts = _flatten(tensor.data)
    if not prompts:
        raise bad_request(f"{TEXT_INPUT} holds no data.")
    if not all(isinstance(p, str) for p in prompts):
        raise bad_request(f"{TEXT_INPUT} data must be strings.")
    if any(d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(prompts):
        raise bad_request(
            f"{TEXT_INPUT} shape {tensor.shape} does not match its {len(prompts)} element(s)."
        )
    for out in req.outputs or []:
        if out.name != TEXT_OUTPUT:
            raise bad_request(f"unknown output {out.name!r}; this model has {TEXT_OUTPUT!r}.")
        if set(out.parameters or {}) - {"binary_data"}:
            raise bad_request(f"output parameters {out.parameters} are not supported.")
    if len(req.outputs or []) > 1:
        raise bad_request(f"{TEXT_OUTPUT} is asked for more than once.")
    return prompts, tensor.shape


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of a (possibly nested) tensor_data list, without recursion."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def build_v2_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(tags=["kserve-v2"])
    # Metadata first: GET /v2/models/{name}/ready must match before GET /v2/models/{name}.
    _add_metadata_routes(router, ctx)
    _add_inference_routes(router, ctx)
    return router


def _add_metadata_routes(router: APIRouter, ctx: ServerContext) -> None:
    tensors_in = [V2TensorMetadata(name=TEXT_INPUT, datatype="BYTES", shape=[-1])]
    tensors_out = [V2TensorMetadata(name=TEXT_OUTPUT, datatype="BYTES", shape=[-1])]
    if ctx.engine.runner_type == "pooling":  # kserve_embeddings.py
        hidden = int(ctx.engine.model_config.hidden_size)
        tensors_out = [V2TensorMetadata(name="embedding", datatype="FP32", shape=[-1, hidden])]

    @router.get("/v2")
    @router.get("/v2/", include_in_schema=False)  # the spec's spelling
    async def server_metadata() -> JSONResponse:
        return _json(
            V2ServerMetadata(name=PLATFORM, version=server_version(), extensions=EXTENSIONS)
        )

    @router.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return _ready_response(ctx, {"ready": True})

    @router.get("/v2/models/{name:path}/ready")
    async def model_ready(name: str) -> JSONResponse:
        model, _ = resolve(ctx, name)
        return _ready_response(ctx, V2ModelReady(name=model, ready=True).model_dump())

    @router.get("/v2/models/{name:path}")
    async def model_metadata(name: str) -> JSONResponse:
        model, _ = resolve(ctx, name)
        return _json(
            V2ModelMetadata(
                name=model,
                versions=[MODEL_VERSION],
                platform=PLATFORM,
                inputs=tensors_in,
                outputs=tensors_out,
            )
        )


def _add_inference_routes(router: APIRouter, ctx: ServerContext) -> None:
    @router.post("/v2/models/{name:path}/infer", openapi_extra=_infer_body_doc())
    async def infer(name: str, raw: Request) -> Response:
        model, version = resolve(ctx, name)
        body = await read_infer_body(raw)
        # Tokenizing (and templating) off the event loop: probes and streams go on.
        requests, shape, as_binary = await asyncio.to_thread(infer_requests, ctx, body, model)
        finals = await cancel_on_disconnect(raw, ctx.collect(requests))
        if isinstance(finals, Response):
            return finals
        texts = [f.outputs[0].text for f in finals]
        output = V2ResponseOutput(name=TEXT_OUTPUT, shape=shape, datatype="BYTES", data=texts)
        response = V2InferResponse(
            model_name=model, model_version=version, id=body.id, outputs=[output]
        )
        if not as_binary:
            return _json(response)
        blob = encode_bytes_tensor(texts)
        output.data, output.parameters = None, {"binary_data_size": len(blob)}
        return binary_response(response.model_dump(exclude_none=True), [blob])

    @router.post("/v2/models/{name:path}/generate")
    async def generate(name: str, body: V2GenerateRequest, raw: Request) -> Response:
        model, version = resolve(ctx, name)
        options = parse_options(body.sampling_values(), has_prompt_logprobs=True)
        prompts = [body.text_input]
        requests = await asyncio.to_thread(
            _engine_requests, ctx, "generate", prompts, options, model
        )
        ctx.check_room(1)
        finals = await cancel_on_disconnect(raw, ctx.collect(requests))
        if isinstance(finals, Response):
            return finals
        out = finals[0].outputs[0]
        return _json(
            V2GenerateResponse(
                model_name=model,
                model_version=version,
                id=body.id,
                text_output=out.text,
                finish_reason=out.finish_reason,
                prompt_logprobs=prompt_logprobs_of(ctx.engine.tokenizer, options.params, finals[0]),
            )
        )

    @router.post("/v2/models/{name:path}/generate_stream")
    async def generate_stream(name: str, body: V2GenerateRequest, raw: Request) -> Response:
        model, version = resolve(ctx, name)
        options = parse_options(body.sampling_values(), has_prompt_logprobs=True)
        if options.params.num_samples > 1:
            raise bad_request("best_of greater than 1 cannot be streamed.", "best_of")
        prompts = [body.text_input]
        requests = await asyncio.to_thread(
            _engine_requests, ctx, "generate", prompts, options, model
        )
        ctx.check_room(1)
        events = _stream_events(ctx, requests, model, version, body.id, raw.url.path)
        return StreamingResponse(events, media_type="text/event-stream")


def _infer_body_doc() -> dict[str, Any]:
    """The infer route's body in the OpenAPI document (the route reads it by hand)."""
    schema = V2InferRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:  # `#/$defs/X` refs point nowhere inside the document
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    binary = {"type": "string", "format": "binary"}  # JSON header, then tensor bytes
    content = {
        "application/json": {"schema": inline(schema)},
        BINARY_CONTENT_TYPE: {"schema": binary},
    }
    return {"requestBody": {"required": True, "content": content}}


def _ready_response(ctx: ServerContext, body: dict[str, Any]) -> JSONResponse:
    try:
        ctx.engine.check_health()
    except EngineDeadError as exc:
        return JSONResponse({"error": str(exc)}, 503)
    return JSONResponse(body)


def _engine_requests(
    ctx: ServerContext, kind: str, prompts: list[str], options: KServeOptions, model: str
) -> list[EngineRequest]:
    request_id = ctx.new_id(kind)
    return [
        engine_request(ctx, f"{request_id}-{i}", p, options, TEXT_INPUT, model)
        for i, p in enumerate(prompts)
    ]


async def _stream_events(
    ctx: ServerContext,
    requests: list[EngineRequest],
    model: str,
    version: str | None,
    request_id: str | None,
    path: str,
) -> AsyncIterator[str]:
    """One event per step with the new text (the first with the prompt logprobs asked
    for); the last one carries finish_reason. The OpenAI routes' DeltaTracker cuts them."""
    try:
        async with stream_deltas(ctx, requests, DeltaTracker()) as deltas:
            async for _, output, delta in deltas:
                prompt_logprobs = None
                if delta.is_first:
                    params = requests[0].params
                    prompt_logprobs = prompt_logprobs_of(ctx.engine.tokenizer, params, output)
                event = V2GenerateResponse(
                    model_name=model,
                    model_version=version,
                    id=request_id,
                    text_output=delta.text,
                    finish_reason=delta.finish_reason,
                    prompt_logprobs=prompt_logprobs,
                )
                yield sse(event.model_dump_json(exclude_none=True))
    except APIError as exc:
        yield sse_error(path, exc)
