#!/usr/bin/env python3
"""Attention of one mixed step (decodes plus a prompt chunk) with and without the row split.

    hack/bench/mixed_attention.py --decodes 16 --prompt-len 9 --context 256 --threads 2

Runs every layer's attention forward (K/V write + attend) of a SmolLM2-135M-shaped model
(30 layers, 9 heads, 3 KV heads, head size 64, bfloat16) through the CPU decode backend
with split_mixed on ("split": decode rows through the native paged kernel, the prompt
through SDPA) and off ("unsplit": every row padded to the prompt's length through SDPA),
alternating in each round. Prints one JSON object: per variant the median ms per step over
rounds, min and max, and the metadata build time inside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pinnace.runtime.layers.attention import BatchLayout
from pinnace.runtime.layers.attention.cpu_backend import CPUDecodeAttentionBackend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--decodes", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=9)
    p.add_argument("--context", type=int, default=256, help="tokens each decode has seen")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    heads, kv_heads, dim, bs = 9, 3, 64, 16
    query_lens = [1] * args.decodes + [args.prompt_len]
    computed = [args.context] * args.decodes + [0]
    per_req = [-(-(c + q) // bs) for c, q in zip(computed, query_lens, strict=True)]
    order = torch.randperm(sum(per_req) + 8, generator=torch.Generator().manual_seed(0))
    tables, start = [], 0
    for n in per_req:
        tables.append(order[start : start + n].tolist())
        start += n
    slots = [
        tables[b][pos // bs] * bs + pos % bs
        for b, (c, q) in enumerate(zip(computed, query_lens, strict=True))
        for pos in range(c, c + q)
    ]
    layout = BatchLayout(
        query_lens=query_lens,
        num_computed_tokens=computed,
        block_tables=tables,
        block_size=bs,
        slot_mapping=torch.tensor(slots),
        device=torch.device("cpu"),
    )
    backends = {}
    for name, split in (("split", True), ("unsplit", False)):
        b = CPUDecodeAttentionBackend.create(kv_heads)
        if b is None:
            sys.exit("the native paged decode kernel is not available here")
        b.builder.split_mixed = split  # type: ignore[attr-defined]
        backends[name] = b
    rows = sum(query_lens)
    caches = [torch.randn(2, len(order), kv_heads, bs, dim).bfloat16() for _ in range(args.layers)]
    q = torch.randn(rows, heads, dim).bfloat16()
    k = torch.randn(rows, kv_heads, dim).bfloat16()
    v = torch.randn(rows, kv_heads, dim).bfloat16()
    times: dict[str, list[float]] = {n: [] for n in backends}
    build: dict[str, list[float]] = {n: [] for n in backends}

    def step(name: str) -> tuple[float, float]:
        backend = backends[name]
        t0 = time.perf_counter()
        meta = backend.build_metadata(layout)
        t1 = time.perf_counter()
        for cache in caches:
            backend.forward(q, k, v, cache, meta, dim**-0.5, None)
        return time.perf_counter() - t0, t1 - t0

    for name in backends:  # warm up
        step(name)
    for _ in range(args.rounds):
        for name in backends:
            runs = [step(name) for _ in range(args.steps)]
            times[name].append(statistics.median(r[0] for r in runs) * 1e3)
            build[name].append(statistics.median(r[1] for r in runs) * 1e3)
    result = {
        "config": vars(args),
        **{
            name: {
                "ms_per_step_median": round(statistics.median(ts), 2),
                "min": round(min(ts), 2),
                "max": round(max(ts), 2),
                "build_ms_median": round(statistics.median(build[name]), 3),
            }
            for name, ts in times.items()
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
