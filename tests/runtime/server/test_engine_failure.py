"""The engine thread dies (a fault injected into the engine): /health turns 503 (or the server
has already stopped listening) within 1 s, requests in flight and new ones get a 500 that says
so, and the server stops with exit status 1 (what `pinnace serve` returns), so Kubernetes
restarts the pod."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.llm_engine import LLMEngine
from pinnace.runtime.server.app import ServerSettings, build_app

FAULT = "injected engine fault"


def test_engine_death_is_loud_and_exits_non_zero(
    tiny_model: Path, draining_server: Callable[[Any], Any]
) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model), kv_cache_memory=64 * 2**20))
    srv = draining_server(build_app(engine, ServerSettings(served_model_names=["tiny"])))
    app, thread, exit_codes, url = srv.app, srv.thread, srv.exit_codes, srv.url
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/health").status_code == 200

    # Two requests in flight: one streamed, one whole, both long enough to be cut off.
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}
    whole: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: whole.append(client.post("/v1/completions", json=body))
    )
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first  # generating
        waiter.start()
        wait(lambda: app.state.lifecycle.in_flight == 2, 10)  # both are in
        time.sleep(0.1)

        def boom() -> bool:
            raise RuntimeError(FAULT)

        engine.has_unfinished_requests = boom  # type: ignore[method-assign]
        killed = time.monotonic()
        wait(lambda: unhealthy(client), 1.0)
        assert time.monotonic() - killed < 1.0
        rest = "\n".join(lines)
    assert FAULT in rest and '"code": 500' in rest  # the stream ends with the error
    waiter.join(10)
    [resp] = whole
    assert resp.status_code == 500 and FAULT in resp.json()["error"]["message"]
    thread.join(15)
    assert not thread.is_alive(), "the server kept running on a dead engine"
    assert exit_codes == [1]


def unhealthy(client: httpx.Client) -> bool:
    """/health answers 503, or the server has already stopped listening (it shuts down as
    soon as the engine is dead; a kubelet probe fails either way)."""
    try:
        return client.get("/health").status_code == 503
    except httpx.ConnectError:
        return True


def wait(predicate: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
