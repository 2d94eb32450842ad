"""The engine core in its own process (what `pinnace serve` runs): its death is the
server's, and clients that go away free their KV blocks in the core within a step."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.server.app import ServerSettings, build_app
from pinnace.runtime.server.lifecycle import DrainingServer

NUM_CLIENTS = 32


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    return {"max_num_seqs": NUM_CLIENTS}


def core_pid(app: Any) -> int:
    pid: int = app.state.ctx.engine.client.process.pid
    return pid


def test_core_runs_in_another_process(server: Any, http: httpx.Client) -> None:
    pid = core_pid(server.app)
    assert pid != os.getpid()
    os.kill(pid, 0)  # alive
    body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
    assert http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 5


def test_dropped_streams_free_their_kv_in_the_core(
    server: Any, wait_for: Callable[..., bool]
) -> None:
    engine = server.app.state.ctx.engine
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}

    async def open_and_drop() -> float:
        """32 streams, each read until it generates; then all hang up at once."""
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            generating = 0
            all_generating = asyncio.Event()

            async def one() -> None:
                nonlocal generating
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            assert '"text"' in line
                            break
                    generating += 1
                    if generating == NUM_CLIENTS:
                        all_generating.set()
                    await all_generating.wait()  # leaving closes the connection

            tasks = [asyncio.create_task(one()) for _ in range(NUM_CLIENTS)]
            await asyncio.wait_for(all_generating.wait(), 30)
            usage = engine.stats().kv_cache_usage  # as the core last reported it
            await asyncio.gather(*tasks)
            return usage

    usage_while_running = asyncio.run(open_and_drop())
    dropped = time.monotonic()
    # The counters come from the core's own messages: all 32 aborted, their KV free.
    freed = wait_for(
        lambda: (
            (s := engine.stats()).num_running_reqs + s.num_waiting_reqs == 0
            and s.kv_cache_usage == 0.0
        ),
        10,
    )
    assert freed, f"the core still holds requests: {engine.stats()}"
    assert time.monotonic() - dropped < 2
    assert usage_while_running > 0.0
    assert engine.processor.num_unfinished_requests() == 0


@pytest.fixture
def draining_server(tiny_model: Path) -> Iterator[tuple[Any, DrainingServer, list[int], str]]:
    app = build_app(
        EngineConfig(model=str(tiny_model), kv_cache_memory=64 * 2**20),
        ServerSettings(served_model_names=["tiny"]),
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = DrainingServer(config, app.state.lifecycle, shutdown_timeout=30)
    exit_codes: list[int] = []

    def serve() -> None:
        server.run()
        exit_codes.append(app.state.lifecycle.exit_code)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    yield app, server, exit_codes, url
    server.should_exit = True
    thread.join(15)


def test_core_death_fails_health_and_stops_the_server(
    draining_server: tuple[Any, DrainingServer, list[int], str],
    wait_for: Callable[..., bool],
) -> None:
    app, server, exit_codes, url = draining_server
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/health").status_code == 200
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert '"text"' in next(line for line in lines if line.startswith("data: "))
        os.kill(core_pid(app), signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: client.get("/health").status_code == 503, 2.0)
        assert time.monotonic() - killed < 2.0
        rest = "\n".join(lines)
    assert "engine core process exited" in rest and '"code": 500' in rest
    assert wait_for(lambda: bool(exit_codes), 15), "the server kept running on a dead core"
    assert exit_codes == [1]
    assert not server.started or server.should_exit
