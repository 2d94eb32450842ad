"""Real HTTP servers on 127.0.0.1 for the server tests: uvicorn in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

MODEL_NAME = "tiny"
KV_CACHE_MEMORY = 64 * 2**20


class ServerThread:
    """A `build_app` server on an ephemeral port; `stop()` shuts the engine thread down."""

    def __init__(self, app: Any, api_key: str | None = None) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.app = app
        self.api_key = api_key
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port = 0

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model: Callable[[str], Path]) -> Path:
    return make_tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="session")
def serve_app() -> Callable[..., ServerThread]:
    """serve_app(app, api_key=None) -> a started ServerThread."""
    return lambda app, api_key=None: ServerThread(app, api_key).start()


@pytest.fixture(scope="session")
def start_server() -> Callable[..., ServerThread]:
    """start_server(model, settings=..., **engine_options) -> a started ServerThread."""
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.engine.llm_engine import LLMEngine
    from pinnace.runtime.server.app import ServerSettings, build_app

    def start(model: Path | str, settings: dict[str, Any] | None = None, **engine: Any) -> Any:
        engine.setdefault("kv_cache_memory", KV_CACHE_MEMORY)
        llm_engine = LLMEngine(EngineConfig(model=str(model), **engine))
        options = {"served_model_names": [MODEL_NAME], **(settings or {})}
        app = build_app(llm_engine, ServerSettings(**options))
        return ServerThread(app, options.get("api_key")).start()

    return start


def _parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample, with the Prometheus text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="session")
def parse_metrics() -> Callable[[str], dict[str, float]]:
    return _parse_metrics


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., bool]:
    return _wait_for
