#!/usr/bin/env python3
"""bf16 decode matmuls: the native GEMV against oneDNN's packed GEMM, by activation rows.

    hack/bench/linear_kernels.py --threads 2 --rounds 7 [--no-amx] [--compare-avx512]
        [--rows 1,2,4,8,16,17,24,32] [--lm-head]

Runs SmolLM2-135M's 120 layer matmuls (qkv, o, gate_up, down x 30; random weights) per
round (--lm-head: its tied 49152 x 576 head instead, 8 times), the kernels alternating, and
prints one JSON object: per row count the median GB/s of weights read by each and packed
time / GEMV time (> 1: the GEMV is faster; min and max over rounds in packed_over_gemv_range;
*_best_gb_s: the fastest round's, the least disturbed on a contended machine),
with the read bandwidth the GEMV's load pattern reaches on a 1 GiB buffer in the same run
and the load average before and after. oneDNN's weights are packed as PackedLinear packs
them (no batch-size hint). --no-amx keeps the GEMV on AVX-512 (its path on CPUs without
AMX); --compare-avx512 adds that path as a third kernel (gemv_avx512) in the same rounds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from pinnace.runtime.kernels.bf16_gemv import bf16_gemv, read_bandwidth, use_amx

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per layer
LM_HEAD = [(49152, 576)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default="1,2,4,5,6,8,12")
    parser.add_argument("--no-amx", action="store_true", help="the GEMV without AMX tiles")
    parser.add_argument("--compare-avx512", action="store_true", help="also the AVX-512 path")
    parser.add_argument("--lm-head", action="store_true", help="the LM head's shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemv = bf16_gemv()
    if gemv is None:
        raise SystemExit("the native bf16 GEMV is unavailable here")
    amx = use_amx(not args.no_amx)
    shapes, sets = (LM_HEAD, 8) if args.lm_head else (SHAPES, 30)
    weights = [[torch.randn(n, k).bfloat16() * 0.05 for n, k in shapes] for _ in range(sets)]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws] for ws in weights]
    kinds = ["gemv", "packed"] + (["gemv_avx512"] if args.compare_avx512 else [])
    load_before = os.getloadavg()[0]
    nbytes = sum(w.numel() * 2 for ws in weights for w in ws)

    def run(rows: int, kind: str) -> float:
        xs = {k: torch.randn(rows, k).bfloat16() for _, k in shapes}
        if kind != "packed":
            use_amx(amx and kind == "gemv")
        start = time.perf_counter()
        for ws, ps in zip(weights, packed, strict=True):
            for w, p in zip(ws, ps, strict=True):
                x = xs[w.shape[1]]
                if kind != "packed":
                    gemv(x, w, None)
                else:
                    torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        return time.perf_counter() - start

    row_counts = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for rows in row_counts:
            for kind in kinds:
                times[rows, kind].append(run(rows, kind))
    bandwidth = read_bandwidth(1 << 30)

    def ratios(rows: int, kind: str = "gemv") -> list[float]:
        pairs = zip(times[rows, "packed"], times[rows, kind], strict=True)
        return [p / g for p, g in pairs]

    def gb_s(
        rows: int, kind: str, pick: Callable[[list[float]], float] = statistics.median
    ) -> float:
        return round(nbytes / pick(times[rows, kind]) / 1e9, 2)

    result = {
        "bench": "linear_kernels",
        "threads": args.threads,
        "rounds": args.rounds,
        "gemv_amx": amx,
        "shapes": "lm_head" if args.lm_head else "layers",
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "read_bandwidth_gb_s": None if bandwidth is None else round(bandwidth / 1e9, 2),
        "rows": {
            rows: {
                **{f"{kind}_gb_s": gb_s(rows, kind) for kind in kinds},
                **{f"{kind}_best_gb_s": gb_s(rows, kind, min) for kind in kinds},
                "packed_over_gemv": round(statistics.median(ratios(rows)), 3),
                "packed_over_gemv_range": [
                    round(min(ratios(rows)), 3),
                    round(max(ratios(rows)), 3),
                ],
            }
            for rows in row_counts
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
