"""KServe V2 inference on a pooling server: text in, embeddings out.

The same `text_input` BYTES tensor as on a generate server; the answer is one FP32 tensor
`embedding` of shape [*input shape, hidden] (row-major data), each row the prompt's pooled
hidden states as /v1/embeddings gives them. JSON in and out over REST (binary inputs are
accepted as on the generate route); over gRPC, fp32_contents or raw little-endian bytes.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.server.embeddings import MAX_EMBEDDING_INPUTS
from pinnace.runtime.server.errors import bad_request
from pinnace.runtime.server.kserve_protocol import V2InferRequest, V2InferResponse, V2ResponseOutput
from pinnace.runtime.server.kserve_v2 import read_infer_body, resolve, text_prompts
from pinnace.runtime.server.serving import ServerContext

EMBEDDING_OUTPUT = "embedding"


def embedding_prompts(req: V2InferRequest) -> tuple[list[str], list[int]]:
    """The prompts and input shape of an embeddings infer request; 400 if it asks for an
    output other than `embedding` or for binary data."""
    for out in req.outputs or []:
        if out.name != EMBEDDING_OUTPUT:
            raise bad_request(f"unknown output {out.name!r}; this model has {EMBEDDING_OUTPUT!r}.")
        if out.parameters:
            raise bad_request(f"output parameters {out.parameters} are not supported.")
    if req.parameters:
        raise bad_request(f"parameters {req.parameters} are not supported for embeddings.")
    return text_prompts(req.model_copy(update={"outputs": None}))


async def embed_infer(
    ctx: ServerContext, body: V2InferRequest, model: str
) -> tuple[list[int], np.ndarray]:
    """(output shape, float32 vectors [N, hidden]) of an infer request on a pooling
    server; REST and gRPC share it."""
    if ctx.lora_for(model) is not None:
        raise bad_request("embeddings run on the base model, not a LoRA adapter.")
    texts, shape = embedding_prompts(body)
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise bad_request(
            f"inputs hold {len(texts)} prompts; at most {MAX_EMBEDDING_INPUTS} per request.",
            "inputs",
        )
    params = SamplingParams(max_tokens=1)
    prompts = [await asyncio.to_thread(ctx.prepare, t, params, "inputs") for t in texts]
    outs = await ctx.engine.embed(prompts)
    vectors = np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
    return [*shape, vectors.shape[1]], vectors


def build_v2_embeddings_router(ctx: ServerContext) -> APIRouter:
    """POST /v2/models/{name}/infer answered with embeddings (registered before the
    generate route, which a pooling server does not serve)."""
    router = APIRouter(tags=["kserve-v2"])

    @router.post("/v2/models/{name:path}/infer")
    async def infer(name: str, raw: Request) -> JSONResponse:
        model, version = resolve(ctx, name)
        body = await read_infer_body(raw)
        shape, vectors = await embed_infer(ctx, body, model)
        output = V2ResponseOutput(
            name=EMBEDDING_OUTPUT, shape=shape, datatype="FP32", data=vectors.reshape(-1).tolist()
        )
        response = V2InferResponse(
            model_name=model, model_version=version, id=body.id, outputs=[output]
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    return router
