"""Real HTTP servers on 127.0.0.1 for the server tests (ServerThread: ../conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

MODEL_NAME = "tiny"
KV_CACHE_MEMORY = 64 * 2**20


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model: Callable[[str], Path]) -> Path:
    return make_tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="session")
def start_server(serve_app: Callable[..., Any]) -> Callable[..., Any]:
    """start_server(model, settings=..., **engine_options) -> a started ServerThread."""
    from pinnace.runtime.config import EngineConfig
    from pinnace.runtime.server.app import ServerSettings, build_app

    def start(model: Path | str, settings: dict[str, Any] | None = None, **engine: Any) -> Any:
        engine.setdefault("kv_cache_memory", KV_CACHE_MEMORY)
        options = {"served_model_names": [MODEL_NAME], **(settings or {})}
        # As `pinnace serve` runs: the engine core in a process of its own.
        app = build_app(EngineConfig(model=str(model), **engine), ServerSettings(**options))
        return serve_app(app, options.get("api_key"))

    return start


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    """start_server's arguments for this module's `server`: a test module overrides this
    fixture (module scope) to size the engine for what it checks."""
    return {}


@pytest.fixture(scope="module")
def server(
    start_server: Callable[..., Any], tiny_model: Path, server_options: dict[str, Any]
) -> Iterator[Any]:
    """One server on the tiny model for the whole test module."""
    srv = start_server(tiny_model, **server_options)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


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


class DrainingServerThread:
    """A `build_app` server run as `pinnace serve` runs it (DrainingServer: a dead engine
    stops it) on an ephemeral port; `exit_codes` gets its exit status once it stops."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from pinnace.runtime.server.lifecycle import DrainingServer

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.app = app
        self.server = DrainingServer(config, app.state.lifecycle, shutdown_timeout=30)
        self.exit_codes: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def _serve(self) -> None:
        self.server.run()
        self.exit_codes.append(self.app.state.lifecycle.exit_code)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def draining_server() -> Iterator[Callable[[Any], DrainingServerThread]]:
    """draining_server(app) -> a started DrainingServerThread (stopped after the test)."""
    started: list[DrainingServerThread] = []

    def start(app: Any) -> DrainingServerThread:
        started.append(DrainingServerThread(app))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()
