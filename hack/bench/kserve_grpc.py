#!/usr/bin/env python3
"""Open Inference Protocol over gRPC vs REST: the same infer work through Triton's clients.

    pinnace serve --grpc-port 8081 &
    hack/bench/kserve_grpc.py --num-prompts 32 --max-tokens 16 --rounds 5

Three shapes of the same work, each timed in interleaved rounds (REST, gRPC, REST, ...):
`batch` sends the prompts as one BYTES tensor of N elements; `concurrent` sends N
one-prompt requests at once; `ready` sends N model-ready checks at once (the protocol
stack alone, no engine work). Outputs are greedy with ignore_eos, so both protocols
generate exactly the same tokens. REST sends JSON and asks for binary outputs (Triton's
client default); gRPC uses raw contents. The report is one JSON object with each
protocol's median wall time and prompts/s per shape, and gRPC's speed-up over REST.
Needs tritonclient[http,grpc]; it does not import pinnace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http

PROMPT = "Write a short story about {} in the rain."
TOPICS = ["a lighthouse", "an old map", "a train", "a garden", "a city", "the sea"]


def prompts(num: int) -> list[str]:
    return [PROMPT.format(TOPICS[i % len(TOPICS)]) + f" ({i})" for i in range(num)]


def infer_call(module: Any, client: Any, args: argparse.Namespace, batch: list[str]) -> Any:
    tensor = module.InferInput("text_input", [len(batch)], "BYTES")
    tensor.set_data_from_numpy(np.array(batch, dtype=np.object_))
    params = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    return client.infer(args.model, [tensor], parameters=params, headers=headers)


async def timed(work: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await work()
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = prompts(args.num_prompts)
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    http = triton_http.InferenceServerClient(args.http, conn_limit=args.num_prompts)
    grpc = triton_grpc.InferenceServerClient(args.grpc)
    clients = {"rest": (triton_http, http), "grpc": (triton_grpc, grpc)}
    shapes: dict[str, Callable[[Any, Any], Callable[[], Awaitable[Any]]]] = {
        "batch": lambda m, c: lambda: infer_call(m, c, args, texts),
        "concurrent": lambda m, c: (
            lambda: asyncio.gather(*(infer_call(m, c, args, [t]) for t in texts))
        ),
        # The protocol alone, no engine work: N concurrent model-ready checks.
        "ready": lambda m, c: (
            lambda: asyncio.gather(*(c.is_model_ready(args.model, headers=auth) for _ in texts))
        ),
    }
    times: dict[str, dict[str, list[float]]] = {s: {"rest": [], "grpc": []} for s in shapes}
    try:
        for shape, make in shapes.items():
            for module, client in clients.values():  # warm-up, not timed
                await make(module, client)()
            for _ in range(args.rounds):
                for protocol, (module, client) in clients.items():
                    times[shape][protocol].append(await timed(make(module, client)))
    finally:
        await http.close()
        await grpc.close()
    report: dict[str, Any] = {
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
    }
    for shape, by_protocol in times.items():
        medians = {p: statistics.median(t) for p, t in by_protocol.items()}
        report[shape] = {
            **{f"{p}_s": round(m, 4) for p, m in medians.items()},
            **{f"{p}_prompts_per_s": round(args.num_prompts / m, 2) for p, m in medians.items()},
            "grpc_speedup": round(medians["rest"] / medians["grpc"], 3),
        }
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", default="127.0.0.1:8000", help="REST host:port")
    p.add_argument("--grpc", default="127.0.0.1:8081", help="gRPC host:port")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="served model name")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
