"""The app factory: one engine (its core in a process of its own, or on a thread), OpenAI +
KServe V1/V2 routes, metrics, optional auth."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.async_engine import AsyncLLMEngine
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.server import oip_proto
from pinnace.runtime.server.auth import APIKeyMiddleware
from pinnace.runtime.server.embeddings import build_embeddings_router
from pinnace.runtime.server.errors import install_error_handlers
from pinnace.runtime.server.kserve_embeddings import build_v2_embeddings_router
from pinnace.runtime.server.kserve_grpc import start_grpc_server
from pinnace.runtime.server.kserve_v1 import build_v1_router
from pinnace.runtime.server.kserve_v2 import build_v2_router
from pinnace.runtime.server.lifecycle import Lifecycle
from pinnace.runtime.server.metrics import ServingMetrics
from pinnace.runtime.server.openai_routes import build_openai_router
from pinnace.runtime.server.request_guard import RequestGuard, default_max_body_bytes
from pinnace.runtime.server.runner_guard import build_runner_guard_router
from pinnace.runtime.server.serving import ServerContext, server_version
from pinnace.runtime.server.tools import ToolSettings

logger = logging.getLogger("pinnace.server")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    max_waiting_requests: int | None = None
    # Metric name prefixes: "pinnace", and "vllm" for dashboards built for vLLM.
    metrics_prefixes: list[str] = field(default_factory=lambda: ["pinnace"])
    # LoRA adapters served from the start (`--lora-modules`): name -> PEFT folder.
    lora_modules: dict[str, str] = field(default_factory=dict)
    # The Open Inference Protocol over gRPC on this port (0: any free one); None: off.
    grpc_port: int | None = None
    grpc_host: str = "0.0.0.0"
    # Bodies over this are a 413 before they are read; None: sized from max_model_len
    # (request_guard.default_max_body_bytes).
    max_request_body_bytes: int | None = None
    # After SIGTERM: how long requests in flight may take to finish (lifecycle.py).
    shutdown_timeout: float = 30.0
    # Tool calling (vLLM's --enable-auto-tool-choice / --tool-call-parser).
    tools: ToolSettings = field(default_factory=ToolSettings)

    def __post_init__(self) -> None:
        if self.max_request_body_bytes is not None and self.max_request_body_bytes < 1:
            raise ValueError(
                f"max_request_body_bytes must be at least 1, got {self.max_request_body_bytes}."
            )
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}.")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(
                f"the gRPC port must be in 0..65535 (0: any free port), got {self.grpc_port}."
            )
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served model names must be non-empty.")
        if self.api_key == "":
            raise ValueError("the API key must not be empty (leave it unset for no auth).")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(
                f"max_waiting_requests must be at least 1, got {self.max_waiting_requests}."
            )
        for name, path in self.lora_modules.items():
            if not name or not path:
                raise ValueError(f"a LoRA module needs a name and a path, got {name!r}={path!r}.")
            if name in self.served_model_names:
                raise ValueError(f"LoRA module name {name!r} is the base model's served name.")


def build_app(engine: LLMEngine | EngineConfig, settings: ServerSettings) -> FastAPI:
    """An ASGI app serving a model; its engine core runs while the app's lifespan does.

    An `EngineConfig` starts the core in a process of its own (what `pinnace serve` does);
    an `LLMEngine` is stepped by a thread of this process.
    """
    config = engine if isinstance(engine, EngineConfig) else engine.config
    if settings.lora_modules and not config.enable_lora:
        raise ValueError("LoRA modules need an engine started with enable_lora (--enable-lora).")
    metrics = ServingMetrics(
        settings.served_model_names[0],
        lambda: async_engine.stats(),
        settings.metrics_prefixes,
        max_loras=config.max_loras if config.enable_lora else None,
        speculative=config.speculative is not None,
    )
    if isinstance(engine, EngineConfig):
        async_engine = AsyncLLMEngine.spawn(engine, settings.max_waiting_requests, metrics)
    else:
        async_engine = AsyncLLMEngine(engine, settings.max_waiting_requests, observer=metrics)
    try:
        app = _build_app(async_engine, metrics, settings)
    except BaseException:
        async_engine.shutdown()
        raise
    return app


def _build_app(
    async_engine: AsyncLLMEngine, metrics: ServingMetrics, settings: ServerSettings
) -> FastAPI:
    config = async_engine.config
    lifecycle = Lifecycle()
    async_engine.on_failure = lifecycle.engine_failed
    ctx = ServerContext(
        async_engine,
        settings.served_model_names,
        config.model,
        config.enable_lora,
        settings.tools,
    )
    for name, path in settings.lora_modules.items():
        ctx.adapters.add_at_startup(name, path)
    if settings.grpc_port is not None:
        oip_proto.load()  # a missing proto fails here, before the server starts

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        logger.info("engine core running; serving %s", ", ".join(ctx.model_names))
        grpc_server = None
        if settings.grpc_port is not None:
            # On this event loop: the engine delivers its outputs to the loop it started on.
            grpc_server, app.state.grpc_port = await start_grpc_server(
                ctx, settings.grpc_host, settings.grpc_port, settings.api_key
            )
            logger.info("gRPC (Open Inference Protocol) on port %d", app.state.grpc_port)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            async_engine.shutdown()

    app = FastAPI(title="Pinnace", version=server_version(), lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.include_router(build_runner_guard_router(async_engine.runner_type))  # first: it wins
    if async_engine.runner_type == "pooling":  # V2 infer answers embeddings (before V2's)
        app.include_router(build_v2_embeddings_router(ctx))
    app.include_router(build_openai_router(ctx))
    app.include_router(build_embeddings_router(ctx))
    app.include_router(build_v1_router(ctx))
    app.include_router(build_v2_router(ctx))

    @app.get("/metrics", include_in_schema=False)
    async def render_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    # Outermost: size, Unicode and drain checks come before anything reads the body.
    max_body = settings.max_request_body_bytes or default_max_body_bytes(async_engine.max_model_len)
    app.add_middleware(RequestGuard, lifecycle=lifecycle, max_body_bytes=max_body)
    return app
