"""OpenAI-compatible routes, plus vLLM's /tokenize, /detokenize, /health and /version."""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from pinnace.runtime.engine.async_engine import EngineDeadError
from pinnace.runtime.server.chat import create_chat_completion, render_chat
from pinnace.runtime.server.completions import create_completion
from pinnace.runtime.server.errors import APIError, bad_request
from pinnace.runtime.server.openai_params import message_dicts
from pinnace.runtime.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from pinnace.runtime.server.serving import ServerContext, server_version


def _json(body: BaseModel | Response) -> Response:
    return body if isinstance(body, Response) else JSONResponse(body.model_dump())


def build_openai_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(tags=["openai"])

    def card(name: str) -> ModelCard:
        lora = ctx.lora_for(name)
        if lora is not None:  # vLLM's adapter card: its folder as root, the base as parent
            return ModelCard(id=name, root=lora.lora_path, parent=ctx.model_name)
        return ModelCard(id=name, root=ctx.model_path, max_model_len=ctx.engine.max_model_len)

    @router.get("/health")
    async def health() -> Response:
        try:
            ctx.engine.check_health()
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        return Response(status_code=200)

    @router.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": server_version()})

    @router.get("/v1/models")
    async def list_models() -> JSONResponse:
        models = ModelList(data=[card(n) for n in ctx.served()])
        return JSONResponse(models.model_dump(exclude_none=True))

    @router.get("/v1/models/{name:path}")
    async def get_model(name: str) -> JSONResponse:
        ctx.resolve_model(name)
        ready = ctx.engine.is_running
        body = card(name).model_copy(update={"name": name, "ready": ready})
        return JSONResponse(body.model_dump(exclude_none=True), 200 if ready else 503)

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        text = await ctx.adapters.load(body.lora_name, body.lora_path, body.load_inplace)
        return Response(text, 200)  # plain text, as vLLM answers

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        return Response(await ctx.adapters.unload(body.lora_name), 200)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return _json(await create_completion(ctx, body, raw))

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return _json(await create_chat_completion(ctx, body, raw))

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        ctx.resolve_model(body.model)
        tokenizer = ctx.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages.", "prompt")
        if body.messages is not None:
            messages = message_dicts(body.messages)
            work = functools.partial(render_chat, tokenizer, messages, body.add_generation_prompt)
        else:
            ctx.check_prompt_chars(len(body.prompt or ""), "prompt")
            add = body.add_special_tokens
            work = functools.partial(tokenizer.encode, body.prompt, add_special_tokens=add)
        ids = list(await asyncio.to_thread(work))  # off the event loop: it may be long
        return JSONResponse(
            TokenizeResponse(
                count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids
            ).model_dump()
        )

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        ctx.resolve_model(body.model)
        vocab = ctx.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of vocabulary (size {vocab}).", "tokens")
        text = str(ctx.engine.tokenizer.decode(body.tokens))
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    return router
