"""SIGTERM to a real `pinnace serve` during 16 streaming requests: readiness turns false at
once, new requests are refused (503), all 16 streams finish normally, then the process
exits on its own within --shutdown-timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

NUM_STREAMS = 16
MAX_TOKENS = 400  # long enough to be mid-stream at SIGTERM on a fast machine
SHUTDOWN_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_one(url: str, started: threading.Event, results: list[dict[str, object]]) -> None:
    body = {"prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    finish, done, usage = None, False, None
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", url + "/v1/completions", json=body) as resp,
    ):
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event["choices"]:
                    finish = choice.get("finish_reason") or finish
                started.set()
    started.set()  # also when refused: the result below says so, without a 60 s wait
    n = usage["completion_tokens"] if usage else None
    results.append({"status": resp.status_code, "done": done, "finish": finish, "n": n})


@pytest.mark.parametrize("to_group", [False, True], ids=["server", "process-group"])
def test_sigterm_drains_streams_then_exits(tiny_model: Path, to_group: bool) -> None:
    """SIGTERM to the server alone (Kubernetes), or to its whole process group (Ctrl+C,
    `timeout`): either way the engine core outlives the drain, then stops with the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pinnace = Path(sys.executable).parent / "pinnace"
    args = [str(pinnace), "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--served-model-name", "tiny", "--max-model-len", "512"]
    args += ["--kv-cache-memory", "64MiB", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        results: list[dict[str, object]] = []
        events = [threading.Event() for _ in range(NUM_STREAMS)]
        threads = [
            threading.Thread(target=stream_one, args=(url, e, results), daemon=True) for e in events
        ]
        for t in threads:
            t.start()
        for e in events:
            assert e.wait(60), "a stream did not start"
        in_flight = sum(t.is_alive() for t in threads)
        helpers = descendants(proc.pid)  # the forkserver and the engine-core process
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # Readiness false at once, and new work refused, while the streams go on.
        health = _status(url, "GET", "/health")
        new = _status(url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert health in (503, None) and new in (503, None), (health, new)
        assert time.monotonic() - sent < 2.0  # at once (a loaded CI machine may be slow)
        for t in threads:
            t.join(SHUTDOWN_TIMEOUT)
        code = proc.wait(SHUTDOWN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    assert in_flight >= NUM_STREAMS // 2, in_flight  # the signal came mid-stream
    assert len(results) == NUM_STREAMS, log[-3000:]
    for r in results:
        assert r == {"status": 200, "done": True, "finish": "length", "n": MAX_TOKENS}, r
    # uvicorn re-raises the SIGTERM once shut down: killed by it (143), or a clean 0.
    assert code in (0, -signal.SIGTERM), (code, log[-3000:])
    assert "draining" in log
    # The engine core ran in a process of its own, and it stopped with the server.
    assert len(helpers) >= 1, helpers
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in helpers):
        assert time.monotonic() < deadline, f"left running: {helpers}"
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _healthy(url: str) -> bool:
    return _status(url, "GET", "/health") == 200


def _status(url: str, method: str, path: str, body: object = None) -> int | None:
    """The status code, or None when the connection is refused (also a refusal)."""
    try:
        return httpx.request(method, url + path, json=body, timeout=5).status_code
    except httpx.TransportError:
        return None
