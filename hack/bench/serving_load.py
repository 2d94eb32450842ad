"""The load generator of hack/bench/serving.py: streamed requests with Poisson arrivals
against one OpenAI-compatible server, and the latency report of a run.

Each request streams a chat (or, with --endpoint completions, a text) completion; TTFT,
inter-token latency (gaps between streamed chunks), time per output token and end-to-end
latency come out as percentiles in milliseconds, token counts from the server's `usage`.

The client is aiohttp, as vLLM's own serving benchmark: it shares this machine's two cores
with the server, and per streamed chunk it takes about a fifth of httpx's CPU time (48
streams x 64 tokens at saturation: 0.07-0.08 s vs 0.33-0.34 s of client CPU per run, time
an OpenMP step of the server waits for a core). `client_cpu_s` reports what it took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TOPICS = ["the sea", "a lighthouse", "autumn", "a city at night", "an old map", "rain",
          "a mountain village", "the first snow", "a train journey", "a garden"]  # fmt: skip
FORMS = ["Write a short story about {}.", "Describe {} in a few sentences.",
         "Write a poem about {}.", "Explain why people love {}."]  # fmt: skip


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


def make_prompts(num: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(FORMS).format(rng.choice(TOPICS)) for _ in range(num)]


def request_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension: fixed-length outputs
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(
    client: aiohttp.ClientSession, args: argparse.Namespace, prompt: str
) -> Result:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = args.base_url.rstrip("/") + path
    result = Result()
    start = last = time.perf_counter()
    try:
        async with client.post(url, json=request_body(args, prompt)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return result
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not _has_text(chunk):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = repr(exc)
        return result
    result.e2e = time.perf_counter() - start
    result.ok = True
    return result


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices", []):
        text = choice.get("text") or (choice.get("delta") or {}).get("content")
        if text:
            return True
    return False


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = make_prompts(args.num_prompts, args.seed)
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=args.num_prompts + 8)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    load_before = os.getloadavg()[0]
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout, read_bufsize=2**20
    ) as client:
        tasks = []
        start, cpu = time.perf_counter(), time.process_time()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(client, args, prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    report_ = report(args, results, duration)
    # This client shares the machine's cores with the server: what it took of them.
    report_["client_cpu_s"] = time.process_time() - cpu
    # The machine's 1-minute load average before and after: a contended run says so.
    report_["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return report_


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = sorted(v * 1000 for v in values)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, round(p / 100 * (len(ms) - 1)))]

    return {"mean": statistics.fmean(ms), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": ms[-1]}  # fmt: skip


def report(args: argparse.Namespace, results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
        "max_tokens": args.max_tokens,
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
    }
