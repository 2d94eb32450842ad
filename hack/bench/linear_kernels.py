#!/usr/bin/env python3
"""bf16 decode matmuls: the native GEMV against oneDNN's packed GEMM, by activation rows.

    hack/bench/linear_kernels.py --threads 2 --rounds 7 [--no-amx]

Runs SmolLM2-135M's 120 layer matmuls (qkv, o, gate_up, down x 30; random weights) per
round, both kernels alternating, and prints one JSON object: per row count the median
GB/s of weights read by each and packed time / GEMV time (> 1: the GEMV is faster), with
the read bandwidth the GEMV's load pattern reaches on a 1 GiB buffer in the same run.
--no-amx keeps the GEMV on AVX-512 (its path on CPUs without AMX).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time

import torch

from pinnace.runtime.kernels.bf16_gemv import bf16_gemv, read_bandwidth, use_amx

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default="1,2,4,5,6,8,12")
    parser.add_argument("--no-amx", action="store_true", help="the GEMV without AMX tiles")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemv = bf16_gemv()
    if gemv is None:
        raise SystemExit("the native bf16 GEMV is unavailable here")
    amx = use_amx(not args.no_amx)
    weights = [[torch.randn(n, k).bfloat16() * 0.05 for n, k in SHAPES] for _ in range(30)]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws] for ws in weights]
    nbytes = sum(w.numel() * 2 for ws in weights for w in ws)

    def run(rows: int, kind: str) -> float:
        xs = {k: torch.randn(rows, k).bfloat16() for _, k in SHAPES}
        start = time.perf_counter()
        for ws, ps in zip(weights, packed, strict=True):
            for w, p in zip(ws, ps, strict=True):
                x = xs[w.shape[1]]
                if kind == "gemv":
                    gemv(x, w, None)
                else:
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        return time.perf_counter() - start

    row_counts = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for rows in row_counts:
            for kind in ("gemv", "packed"):
                times[rows, kind].append(run(rows, kind))
    bandwidth = read_bandwidth(1 << 30)

    def ratio(rows: int) -> float:
        pairs = zip(times[rows, "packed"], times[rows, "gemv"], strict=True)
        return round(statistics.median(p / g for p, g in pairs), 3)

    result = {
        "bench": "linear_kernels",
        "threads": args.threads,
        "rounds": args.rounds,
        "gemv_amx": amx,
        "read_bandwidth_gb_s": None if bandwidth is None else round(bandwidth / 1e9, 2),
        "rows": {
            rows: {
                "gemv_gb_s": round(nbytes / statistics.median(times[rows, "gemv"]) / 1e9, 2),
                "packed_gb_s": round(nbytes / statistics.median(times[rows, "packed"]) / 1e9, 2),
                "packed_over_gemv": ratio(rows),
            }
            for rows in row_counts
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
