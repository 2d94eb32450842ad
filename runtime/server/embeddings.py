"""OpenAI's /v1/embeddings on the served decoder: its final hidden states pooled as the
engine's default says (a sentence-transformers folder's config, else last token,
normalised), answered as floats or as base64 of little-endian float32 (OpenAI's wire form).

`dimensions` truncates and re-normalises only for models trained for it (Matryoshka
embeddings: `matryoshka_dimensions` in config.json); anything else is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from pinnace.runtime.sampling_params import SamplingParams
from pinnace.runtime.server.errors import bad_request
from pinnace.runtime.server.openai_protocol import UsageInfo
from pinnace.runtime.server.serving import ServerContext


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


# OpenAI's own limit on inputs per request: past it a 400, before anything is tokenized.
MAX_EMBEDDING_INPUTS = 2048


def _inputs(body: EmbeddingRequest) -> list[str | list[int]]:
    raw = body.input
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        return [raw]
    if not raw:
        raise bad_request("input must not be empty.", "input")
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise bad_request(
            f"input has {len(raw)} items; at most {MAX_EMBEDDING_INPUTS} per request.", "input"
        )
    return list(raw)  # type: ignore[arg-type]


def _truncate(vector: np.ndarray, dimensions: int | None, allowed: list[int]) -> np.ndarray:
    if dimensions is None or dimensions == vector.shape[-1]:
        return vector
    if dimensions not in allowed:
        supported = f"one of {allowed}" if allowed else "not supported by this model"
        raise bad_request(f"dimensions={dimensions} is {supported}.", "dimensions")
    cut = vector[:dimensions]
    return cut / max(float(np.linalg.norm(cut)), 1e-12)


def build_embeddings_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(tags=["openai"])
    config = ctx.engine.model_config
    matryoshka = [int(d) for d in getattr(config, "matryoshka_dimensions", None) or []]

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        model = ctx.resolve_model(body.model)
        if ctx.lora_for(model) is not None:
            raise bad_request("embeddings run on the base model, not a LoRA adapter.", "model")
        if body.dimensions is not None and body.dimensions < 1:
            raise bad_request("dimensions must be a positive integer.", "dimensions")
        params = SamplingParams(max_tokens=1)
        prompts = [await asyncio.to_thread(ctx.prepare, p, params, "input") for p in _inputs(body)]
        outs = await ctx.engine.embed(prompts)
        data = []
        for i, out in enumerate(outs):
            vector = _truncate(
                np.asarray(out.outputs.embedding, np.float32), body.dimensions, matryoshka
            )
            if body.encoding_format == "base64":
                encoded: list[float] | str = base64.b64encode(
                    vector.astype("<f4").tobytes()
                ).decode()
            else:
                encoded = vector.tolist()
            data.append(EmbeddingData(index=i, embedding=encoded))
        usage = UsageInfo.of(sum(len(p) for p in prompts), 0)
        return JSONResponse(EmbeddingResponse(data=data, model=model, usage=usage).model_dump())

    return router
