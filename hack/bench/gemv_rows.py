#!/usr/bin/env python3
"""The native bf16 GEMV against oneDNN's packed GEMM per weight shape and row count.

    hack/bench/gemv_rows.py --threads 2 --rounds 9 --rows 32,33,40,48,56,64

Per round, row count and shape (out x in; SmolLM2-135M's by default: fused qkv 960, o 576,
a kv 192, fused gate_up 3072, an up 1536, down, and the 49152 x 576 LM head) one pass over
`copies` random weights of that shape with each kernel, back to back, their order swapped
every round (a contended machine's drift falls on both alike). oneDNN's weights are packed
as PackedLinear packs them (no batch-size hint). Prints one JSON object: per row count and
shape the median GB/s of weights read by each kernel and packed time / GEMV time (> 1: the
GEMV is faster) with its min and max over rounds (*_best_gb_s: the fastest round's, the
least disturbed on a contended machine); "step" sums the shapes a decode step runs
(qkv, o, gate_up, down x 30 and the LM head) per round before the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from pinnace.runtime.kernels.bf16_gemv import bf16_gemv, use_amx

# name: (out, in, copies); copies: 30 layers, the LM head once per step (4: past the caches)
SHAPES = {
    "qkv": (960, 576, 30),
    "o": (576, 576, 30),
    "kv": (192, 576, 30),
    "gate_up": (3072, 576, 30),
    "up": (1536, 576, 30),
    "down": (576, 1536, 30),
    "lm_head": (49152, 576, 4),
}
STEP = {"qkv": 30, "o": 30, "gate_up": 30, "down": 30, "lm_head": 1}  # calls per step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", default="32,33,40,48,56,64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemv = bf16_gemv()
    if gemv is None:
        raise SystemExit("the native bf16 GEMV is unavailable here")
    amx = use_amx(True)
    names = args.shapes.split(",")
    weights = {
        name: [torch.randn(SHAPES[name][:2]).bfloat16() * 0.05 for _ in range(SHAPES[name][2])]
        for name in names
    }
    packed = {
        name: [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
        for name, ws in weights.items()
    }
    row_counts = [int(r) for r in args.rows.split(",")]
    load_before = os.getloadavg()[0]

    def run(name: str, x: torch.Tensor, kind: str) -> float:
        start = time.perf_counter()
        if kind == "gemv":
            for w in weights[name]:
                gemv(x, w, None)
        else:
            for p in packed[name]:
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        return (time.perf_counter() - start) / len(weights[name])  # per call

    # times[rows][name][kind]: seconds per call, one per round
    times = {r: {n: {"gemv": [], "packed": []} for n in names} for r in row_counts}
    for round_ in range(args.rounds):
        kinds = ("gemv", "packed") if round_ % 2 == 0 else ("packed", "gemv")
        for rows in row_counts:
            for name in names:
                x = torch.randn(rows, SHAPES[name][1]).bfloat16()
                for kind in kinds:
                    times[rows][name][kind].append(run(name, x, kind))

    def summary(per_round: dict[str, list[float]], nbytes: int) -> dict[str, object]:
        ratios = [p / g for p, g in zip(per_round["packed"], per_round["gemv"], strict=True)]
        return {
            "gemv_gb_s": round(nbytes / statistics.median(per_round["gemv"]) / 1e9, 2),
            "packed_gb_s": round(nbytes / statistics.median(per_round["packed"]) / 1e9, 2),
            "gemv_best_gb_s": round(nbytes / min(per_round["gemv"]) / 1e9, 2),
            "packed_best_gb_s": round(nbytes / min(per_round["packed"]) / 1e9, 2),
            "packed_over_gemv": round(statistics.median(ratios), 3),
            "packed_over_gemv_range": [round(min(ratios), 3), round(max(ratios), 3)],
        }

    def step(rows: int) -> dict[str, object] | None:
        if not all(n in names for n in STEP):
            return None
        per_round = {
            kind: [sum(STEP[n] * times[rows][n][kind][i] for n in STEP) for i in range(args.rounds)]
            for kind in ("gemv", "packed")
        }
        nbytes = sum(STEP[n] * SHAPES[n][0] * SHAPES[n][1] * 2 for n in STEP)
        return summary(per_round, nbytes)

    result = {
        "bench": "gemv_rows",
        "threads": args.threads,
        "rounds": args.rounds,
        "gemv_amx": amx,
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": {
            rows: {
                **{
                    name: summary(times[rows][name], SHAPES[name][0] * SHAPES[name][1] * 2)
                    for name in names
                },
                "step": step(rows),
            }
            for rows in row_counts
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
