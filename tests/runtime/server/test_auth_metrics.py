"""API-key auth, Prometheus metrics (pinnace: and vllm: names), and 503 when busy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

MODEL = "tiny"
KEY = "sk-test-key"
LABEL = f'model_name="{MODEL}"'
SERIES = [
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "num_preemptions_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "time_to_first_token_seconds_count",
    "inter_token_latency_seconds_count",
    "e2e_request_latency_seconds_count",
    "request_queue_time_seconds_count",
]


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_model: Path) -> Iterator[Any]:
    settings = {
        "api_key": KEY,
        "metrics_prefixes": ["pinnace", "vllm"],
        "max_waiting_requests": 2,
    }
    srv = start_server(tiny_model, settings, max_model_len=512, max_num_seqs=2)
    yield srv
    srv.stop()


def make_client(server: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_openai_client_needs_the_key(server: Any) -> None:
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        make_client(server, "wrong").models.list()
    resp = httpx.get(f"{server.url}/v1/models")
    assert resp.status_code == 401 and "Missing API key" in resp.json()["error"]["message"]
    assert resp.headers["www-authenticate"] == "Bearer"
    assert make_client(server, KEY).models.list().data[0].id == MODEL


@pytest.mark.parametrize(
    "path", ["/version", "/v2", f"/v2/models/{MODEL}", f"/v1/models/{MODEL}", "/openapi.json"]
)
def test_every_other_route_is_protected(server: Any, path: str) -> None:
    resp = httpx.get(f"{server.url}{path}")
    assert resp.status_code == 401
    error = resp.json()["error"]
    # KServe routes keep their own error shape.
    assert isinstance(error, str) if path.startswith("/v2") else error["code"] == 401
    ok = httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v2/health/live", "/v2/health/ready"])
def test_probes_and_metrics_are_open(server: Any, path: str) -> None:
    assert httpx.get(f"{server.url}{path}").status_code == 200


def test_metrics_parse_and_move(
    server: Any, parse_metrics: Callable[[str], dict[str, float]]
) -> None:
    before = parse_metrics(server.metrics())
    for prefix in ("pinnace", "vllm"):
        for name in SERIES:
            assert f"{prefix}:{name}{{{LABEL}}}" in before, f"{prefix}:{name} missing"
    with server.client() as http:
        prompt = "Count to ten:"
        num_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
        body = {"prompt": prompt, "max_tokens": 7, "ignore_eos": True}
        assert http.post("/v1/completions", json=body).status_code == 200
    after = parse_metrics(server.metrics())

    def moved(name: str, labels: str = LABEL) -> float:
        key = f"pinnace:{name}{{{labels}}}"
        vllm = after[key.replace("pinnace:", "vllm:")]
        assert vllm == after[key], f"vllm:{name} differs from pinnace:{name}"
        return after[key] - before.get(key, 0.0)

    assert moved("prompt_tokens_total") == num_prompt
    assert moved("generation_tokens_total") == 7
    assert moved("request_success_total", f'finished_reason="length",{LABEL}') == 1
    assert moved("time_to_first_token_seconds_count") == 1
    assert moved("inter_token_latency_seconds_count") == 6
    assert moved("e2e_request_latency_seconds_count") == 1
    assert moved("request_queue_time_seconds_count") == 1
    assert moved("prefix_cache_queries_total") == num_prompt
    assert after[f"pinnace:e2e_request_latency_seconds_sum{{{LABEL}}}"] > 0
    assert after[f"pinnace:num_requests_running{{{LABEL}}}"] == 0


def test_busy_server_answers_503_with_retry_after(
    server: Any,
    parse_metrics: Callable[[str], dict[str, float]],
    wait_for: Callable[..., bool],
) -> None:
    def gauges() -> tuple[float, float]:
        m = parse_metrics(server.metrics())
        return m[f"pinnace:num_requests_running{{{LABEL}}}"], m[
            f"pinnace:num_requests_waiting{{{LABEL}}}"
        ]

    body = {"prompt": "Go on:", "max_tokens": 500, "ignore_eos": True, "stream": True}
    # max_num_seqs=2 runs two; max_waiting_requests=2 lets two more wait; the fifth is refused.
    expected = [(1, 0), (2, 0), (2, 1), (2, 2)]
    with server.client() as http, contextlib.ExitStack() as streams:
        for want in expected:
            streams.enter_context(http.stream("POST", "/v1/completions", json=body))
            assert wait_for(lambda w=want: gauges() == w, timeout=20), gauges()
        refused = http.post("/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "max_waiting_requests=2" in refused.json()["error"]["message"]
    assert wait_for(lambda: gauges() == (0, 0), timeout=20), gauges()
