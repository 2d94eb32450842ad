"""64 concurrent streaming clients; half of them hang up mid-stream and lose nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

MODEL = "tiny"
NUM_CLIENTS = 64
LABEL = f'model_name="{MODEL}"'


@pytest.fixture(scope="module")
def server(start_server: Any, tiny_model: Path) -> Iterator[Any]:
    srv = start_server(tiny_model, max_model_len=512)
    yield srv
    srv.stop()


async def stream_chat(
    client: httpx.AsyncClient, index: int, max_tokens: int, hang_up_after: int | None
) -> dict[str, Any]:
    """Stream one chat completion; with `hang_up_after`, close the connection early."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Client {index} says hi"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line:
                continue
            events.append(line)
            if hang_up_after is not None and len(events) >= hang_up_after:
                break  # leaving the block closes the connection mid-stream
    done = events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    usage = chunks[-1].get("usage") if chunks else None
    return {"done": done, "finish": finish[-1] if finish else None, "usage": usage}


def run_clients(server: Any, plan: list[tuple[int, int | None]]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 4)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            jobs = [stream_chat(client, i, n, hang) for i, (n, hang) in enumerate(plan)]
            return await asyncio.gather(*jobs)

    return asyncio.run(main())


def test_64_concurrent_streams_complete(
    server: Any, parse_metrics: Callable[[str], dict[str, float]]
) -> None:
    before = parse_metrics(server.metrics())
    results = run_clients(server, [(16, None)] * NUM_CLIENTS)
    assert all(r["done"] and r["finish"] == "length" for r in results)
    assert all(r["usage"]["completion_tokens"] == 16 for r in results)
    after = parse_metrics(server.metrics())
    key = f'pinnace:request_success_total{{finished_reason="length",{LABEL}}}'
    assert after[key] - before.get(key, 0) == NUM_CLIENTS
    gen = f"pinnace:generation_tokens_total{{{LABEL}}}"
    assert after[gen] - before.get(gen, 0) == NUM_CLIENTS * 16


def test_half_hang_up_mid_stream_frees_everything(
    server: Any,
    parse_metrics: Callable[[str], dict[str, float]],
    wait_for: Callable[..., bool],
) -> None:
    before = parse_metrics(server.metrics())
    # Even clients finish 24 tokens; odd ones ask for 400 and leave after 4 events.
    plan = [(24, None) if i % 2 == 0 else (400, 4) for i in range(NUM_CLIENTS)]
    results = run_clients(server, plan)
    finished, left = results[0::2], results[1::2]
    assert all(r["done"] and r["usage"]["completion_tokens"] == 24 for r in finished)
    assert not any(r["done"] for r in left)

    def drained() -> bool:
        m = parse_metrics(server.metrics())
        return (
            m[f"pinnace:num_requests_running{{{LABEL}}}"] == 0
            and m[f"pinnace:num_requests_waiting{{{LABEL}}}"] == 0
            and m[f"pinnace:kv_cache_usage_perc{{{LABEL}}}"] == 0
        )

    assert wait_for(drained, timeout=30), server.metrics()
    after = parse_metrics(server.metrics())
    aborted = f'pinnace:request_success_total{{finished_reason="abort",{LABEL}}}'
    assert after[aborted] - before.get(aborted, 0) == NUM_CLIENTS // 2
    # Aborted requests stopped early: far fewer than their 400 tokens each were made.
    gen = f"pinnace:generation_tokens_total{{{LABEL}}}"
    assert after[gen] - before[gen] < (NUM_CLIENTS // 2) * (24 + 400) / 2


def test_serving_benchmark_reports_json(server: Any, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[3] / "hack" / "bench" / "serving.py"
    args = [sys.executable, str(script), "--base-url", server.url, "--model", MODEL,
            "--num-prompts", "8", "--request-rate", "40", "--max-tokens", "6", "--ignore-eos",
            "--output", str(tmp_path / "report.json")]  # fmt: skip
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["completed"] == 8 and report["failed"] == 0
    assert report["total_output_tokens"] == 8 * 6
    assert report["output_throughput"] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        stats = report[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert report["e2e_ms"]["p50"] >= report["ttft_ms"]["p50"]


def test_non_streaming_client_that_gives_up_is_aborted(
    server: Any,
    parse_metrics: Callable[[str], dict[str, float]],
    wait_for: Callable[..., bool],
) -> None:
    aborted = f'pinnace:request_success_total{{finished_reason="abort",{LABEL}}}'
    running = f"pinnace:num_requests_running{{{LABEL}}}"
    before = parse_metrics(server.metrics())[aborted]
    body = {"model": MODEL, "prompt": "Go", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    assert wait_for(lambda: parse_metrics(server.metrics())[aborted] == before + 1)
    assert parse_metrics(server.metrics())[running] == 0
