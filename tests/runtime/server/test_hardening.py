"""One bad request never stalls the server: huge bodies are refused before they are read
(413) while /health keeps answering fast, over-long prompts are refused before they are
tokenized, lone surrogates are a 400; and an engine thread that dies is loud."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pinnace.runtime.server.request_guard import default_max_body_bytes, lone_surrogate

MODEL = "tiny"
MAX_MODEL_LEN = 256
BIG = 60 * 2**20  # the 60 MB request


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    return {"max_model_len": MAX_MODEL_LEN}


def rss_bytes() -> int:
    """This process's resident memory (the server runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class HealthPoller:
    """GET /health every 100 ms from a thread; the latency of each answer."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.statuses = url, [], []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                self.statuses.append(client.get(self.url + "/health").status_code)
                self.latencies.append(time.monotonic() - start)
                self._stop.wait(0.1)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def huge_prompt_body(size: int) -> Iterator[bytes]:
    """A completion request of `size` bytes, produced in 1 MiB chunks (never held whole)."""
    head, tail = b'{"model": "tiny", "prompt": "', b'", "max_tokens": 1}'
    yield head
    remaining = size - len(head) - len(tail)
    chunk = b"word " * (2**20 // 5)
    while remaining > 0:
        part = chunk[:remaining]
        remaining -= len(part)
        yield part
    yield tail


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_60mb_request_is_refused_while_health_stays_fast(server: Any, declared: bool) -> None:
    limit = default_max_body_bytes(MAX_MODEL_LEN)
    assert limit < BIG  # the default sized from max_model_len refuses it
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(BIG)
    before = rss_bytes()
    with HealthPoller(server.url) as poller, httpx.Client(timeout=60) as client:
        time.sleep(0.3)  # a few polls before
        resp = client.post(
            server.url + "/v1/completions", content=huge_prompt_body(BIG), headers=headers
        )
        time.sleep(0.3)  # and after
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["code"] == 413 and "--max-request-body-bytes" in error["message"]
    assert len(poller.latencies) >= 5 and set(poller.statuses) == {200}
    assert max(poller.latencies) < 0.2, poller.latencies
    assert rss_bytes() - before < 300 * 2**20
    # and the server goes on serving
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(http: httpx.Client) -> None:
    """Under the body limit, but more characters than max_model_len tokens can hold."""
    prompt = "a" * (default_max_body_bytes(MAX_MODEL_LEN) - 1000)
    start = time.monotonic()
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert "characters" in resp.json()["error"]["message"]
    chat = {"messages": [{"role": "user", "content": prompt}]}
    resp = http.post("/v1/chat/completions", json=chat)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    resp = http.post("/tokenize", json={"prompt": prompt})
    assert resp.status_code == 400
    assert time.monotonic() - start < 5  # tokenizing 16 MB three times would take longer


def test_small_requests_tokenize_on_the_loop_and_large_ones_in_a_thread(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short prompt is tokenized on the event loop (two thread hops cost more than the
    tokenizing: time to first token); a long one in a worker thread, so the loop goes on
    serving streams and probes."""
    import asyncio

    from pinnace.runtime.server.serving import INLINE_PREPARE_BYTES

    threaded: list[str] = []
    real = asyncio.to_thread

    async def recording(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        threaded.append(getattr(func, "func", func).__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", recording)
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    long = {**short, "user": "x" * INLINE_PREPARE_BYTES}  # a large body, short prompt
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for body, path in [(short, "/v1/completions"), (chat, "/v1/chat/completions")]:
        assert http.post(path, json=body).status_code == 200
    assert threaded == []
    assert http.post("/v1/completions", json=long).status_code == 200
    assert threaded == ["prepare_completion"]


SURROGATE_CASES = [
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "ok", "stop": ["x", "a\udfffb"]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}]}, None),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "user": "\ud800"},
        "user",
    ),
    ("/tokenize", {"prompt": "x\udc00y"}, "prompt"),
    (
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["\ud800"]}]},
        None,
    ),
    (f"/v1/models/{MODEL}:predict", {"instances": ["\udbff"]}, "instances[0]"),
]


@pytest.mark.parametrize(("path", "body", "where"), SURROGATE_CASES)
def test_lone_surrogates_are_a_400(
    http: httpx.Client, path: str, body: dict[str, Any], where: str | None
) -> None:
    # ensure_ascii: the surrogate travels as a \\u escape, as a JSON client would send it.
    resp = http.post(
        path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    text = json.dumps(resp.json())
    assert "surrogate" in text
    if where is not None:
        assert where in text


def test_valid_pairs_nul_and_astral_characters_pass(http: httpx.Client) -> None:
    for prompt in ("\ud83d\ude00 smile", "nul\x00inside", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\\ud800 is text here"):
        body = json.dumps({"prompt": prompt, "max_tokens": 2}).encode()
        resp = http.post(
            "/v1/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 200, (prompt, resp.text)


def test_lone_surrogate_finder() -> None:
    assert lone_surrogate(b'{"a": ["ok", {"b": "\\ud800"}]}') == "a[1].b"
    assert lone_surrogate(b'{"a": "\\ud83d\\ude00"}') is None  # a pair: one character
    assert lone_surrogate(b'{"a": "\xed\xa0\x80"}') == "a"  # as UTF-8 bytes
    assert lone_surrogate(b'{"a": "\\\\ud800"}') is None  # an escaped backslash, then text
    assert lone_surrogate(b"\\ud800 not json") is None  # left to the route
    assert lone_surrogate(b"[" * 100_000 + b"]" * 100_000 + b'"\\ud800"') is None


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"stop": [f"s{i}" for i in range(1025)]}, "stop", "at most 1024 stop strings"),
        ({"stop": ["x" * 257]}, "stop", "at most 256 characters"),
        ({"stop": [f"{i:03d}" + "y" * 250 for i in range(300)]}, "stop", "in all"),
        ({"n": 129, "max_tokens": 1}, "n", "128"),
        ({"n": 20, "max_tokens": 250}, "max_tokens", "lower n or max_tokens"),
    ],
)
def test_per_request_cost_is_bounded(
    http: httpx.Client, body: dict[str, Any], param: str, needle: str
) -> None:
    resp = http.post("/v1/completions", json={"prompt": "Hi", **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_a_thousand_stop_strings_work(http: httpx.Client) -> None:
    free = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "seed": 1})
    text = free.json()["choices"][0]["text"]
    assert len(text) > 2
    stops = [f"never{i}" for i in range(999)] + [text[1:3]]
    body = {"prompt": "Hi", "max_tokens": 8, "seed": 1, "stop": stops}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == text[1:3]
    assert text.startswith(choice["text"]) and len(choice["text"]) <= 1
