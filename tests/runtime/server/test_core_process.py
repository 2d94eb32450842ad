"""The engine core in its own process (what `pinnace serve` runs): its death is the
server's, and clients that go away free their KV blocks in the core within a step."""

from __future__ import annotations

import asyncio
import multiprocessing.context
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import zmq

from pinnace.runtime.config import EngineConfig
from pinnace.runtime.engine.core_client import MPClient
from pinnace.runtime.engine.core_messages import CoreReady, dumps
from pinnace.runtime.engine.model_facts import ModelFacts
from pinnace.runtime.server.app import ServerSettings, build_app

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


def start_draining(tiny_model: Path, draining_server: Callable[[Any], Any]) -> Any:
    app = build_app(
        EngineConfig(model=str(tiny_model), kv_cache_memory=64 * 2**20),
        ServerSettings(served_model_names=["tiny"]),
    )
    return draining_server(app)


def health_failed(client: httpx.Client, srv: Any) -> bool:
    """/health answers 503, or the server already stopped with exit status 1 (it stops
    as soon as no request is left in flight)."""
    try:
        return client.get("/health").status_code == 503
    except httpx.ConnectError:
        return srv.exit_codes == [1]


def test_core_death_fails_health_and_stops_the_server(
    tiny_model: Path, draining_server: Callable[[Any], Any], wait_for: Callable[..., bool]
) -> None:
    srv = start_draining(tiny_model, draining_server)
    app, server, exit_codes, url = srv.app, srv.server, srv.exit_codes, srv.url
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/health").status_code == 200
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert '"text"' in next(line for line in lines if line.startswith("data: "))
        os.kill(core_pid(app), signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: health_failed(client, srv), 2.0)
        assert time.monotonic() - killed < 2.0
        rest = "\n".join(lines)
    assert "engine core process exited" in rest and '"code": 500' in rest
    assert wait_for(lambda: bool(exit_codes), 15), "the server kept running on a dead core"
    assert exit_codes == [1]
    assert not server.started or server.should_exit


def test_a_failure_handling_core_events_is_core_death(
    tiny_model: Path, draining_server: Callable[[Any], Any], wait_for: Callable[..., bool]
) -> None:
    """An exception where the front end handles the core's events (it once ended the
    reader task silently: every stream hung, /health said 200) stops the server as a dead
    core does."""
    srv = start_draining(tiny_model, draining_server)
    engine = srv.app.state.ctx.engine
    client = httpx.Client(base_url=srv.url, timeout=30)
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert '"text"' in next(line for line in lines if line.startswith("data: "))

        def broken(event: Any) -> None:
            raise RuntimeError("injected event fault")

        engine._on_step = broken  # the next step's outputs fail to be handled
        assert wait_for(lambda: health_failed(client, srv), 5.0)
        assert not engine.is_running
        rest = "\n".join(lines)
    assert "injected event fault" in rest and '"code": 500' in rest
    assert wait_for(lambda: bool(srv.exit_codes), 15), "the server kept running"
    assert srv.exit_codes == [1]


def test_a_core_that_fails_to_start_leaves_nothing_behind(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPClient binds its sockets in a temporary folder before starting the process: if
    the start fails, the sockets are closed and the folder removed."""
    contexts: list[zmq.Context[Any]] = []

    class RecordingContext(zmq.Context):  # type: ignore[type-arg]
        def __init__(self) -> None:
            super().__init__()
            contexts.append(self)

    def no_start(self: Any) -> None:
        raise OSError("injected: cannot start a process")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(zmq, "Context", RecordingContext)
    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", no_start)
    with pytest.raises(OSError, match="injected"):
        MPClient(EngineConfig(model=str(tiny_model)))
    assert list(tmp_path.iterdir()) == []
    [context] = contexts
    assert context.closed  # term() returns only once its sockets are closed


def test_constraints_compile_in_the_core_only(
    server: Any, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front end only parses a constraint (a bad one is still a 400 naming it); the
    token masks are compiled once, by the core, not in the server's process too."""
    import xgrammar

    compilers: list[Any] = []
    real = xgrammar.GrammarCompiler

    def counting(*args: Any, **kwargs: Any) -> Any:
        compilers.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(xgrammar, "GrammarCompiler", counting)
    body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 4}
    ok = http.post("/v1/completions", json={**body, "structured_outputs": {"regex": "[ab]+"}})
    assert ok.status_code == 200
    assert set(ok.json()["choices"][0]["text"]) <= {"a", "b"}
    bad = http.post("/v1/completions", json={**body, "structured_outputs": {"regex": "[a-"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs"
    assert "could not be compiled" in bad.json()["error"]["message"]
    assert compilers == []  # nothing compiled in this (the front end's) process


def test_runner_type_comes_from_the_core() -> None:
    """The front end takes what the core resolved instead of resolving it again."""
    ready = CoreReady(16, 4, "pooling", dumps((None, SimpleNamespace(vocab_size=8), [1])))
    facts = ModelFacts.of_ready(EngineConfig(model="/nowhere"), ready)
    assert facts.runner_type == "pooling" and facts.vocab_size == 8


def test_stopped_sample_ends_at_its_stop_string(http: httpx.Client) -> None:
    """n=2 across processes: the sample a stop string ends gets no tokens from the step
    the core ran before it heard of the stop (its text and token count end at the stop)."""
    body: dict[str, Any] = {
        "prompt": "Once upon",
        "n": 2,
        "temperature": 1.0,
        "seed": 7,
        "max_tokens": 24,
        "ignore_eos": True,
        "logprobs": 0,
    }
    free = http.post("/v1/completions", json=body).json()["choices"]
    text = free[0]["text"]
    stop = next(text[i : i + 2] for i in range(2, len(text)) if text[i : i + 2].strip())
    stopped = http.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"]
    first = next(c for c in stopped if c["index"] == 0)
    assert first["finish_reason"] == "stop" and first["text"] == text[: text.index(stop)]
    tokens = first["logprobs"]["tokens"]  # one per generated token
    # The last token completed the stop string; nothing came after it.
    assert stop not in "".join(tokens[:-1]) and stop in "".join(tokens)
    assert tokens == free[0]["logprobs"]["tokens"][: len(tokens)]


@pytest.mark.parametrize(
    "chosen", [None, ("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "20000")]
)
def test_core_openmp_waits_passively_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch, chosen: tuple[str, str] | None
) -> None:
    from pinnace.runtime.engine.core_client import _passive_openmp

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    if chosen is not None:
        monkeypatch.setenv(*chosen)
    with _passive_openmp():
        inside = os.environ.get("OMP_WAIT_POLICY")
    assert inside == ("PASSIVE" if chosen is None else dict([chosen]).get("OMP_WAIT_POLICY"))
    assert os.environ.get("OMP_WAIT_POLICY") == (None if chosen is None else inside)
