#!/usr/bin/env python3
"""Prefill-only time of Pinnace on the SmolLM2-135M shape (random bf16 weights): generate
with max_tokens=1, so one request's time is its prompt's forward plus one sample.

    hack/bench/prefill_step.py --pythons ../before/.venv/bin/python,.venv/bin/python

Workloads: `short`, the serving benchmark's saturation step (48 prompts of ~8 tokens from
serving_load.make_prompts, all at once: one forward of ~380 tokens); `long`, one prompt of
--long-len random tokens in chunks of --chunk (max_num_batched_tokens). Each interpreter
(one per checkout, for a before/after) runs as its own process per round, the interpreters
alternating within each round so that load on a shared machine hits both alike. Prints
one JSON object: per interpreter and workload, the median over rounds of each round's
median ms per generate, with the min and max over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args: argparse.Namespace) -> None:
    """One engine, `--repeats` timed generates of one workload; prints the ms list."""
    sys.path.insert(0, HERE)
    import torch
    from serving_load import make_prompts
    from transformers import AutoTokenizer

    from pinnace.runtime import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    if args.workload == "short":
        tok = AutoTokenizer.from_pretrained(args.model)
        prompts = [tok(t)["input_ids"] for t in make_prompts(48, 0)]
    else:
        import random

        rng = random.Random(0)
        prompts = [[rng.randrange(100, 49152) for _ in range(args.long_len)]]
    llm = LLM(
        args.model,
        dtype="bfloat16",
        max_num_seqs=64,
        kv_cache_memory=1024**3,
        max_model_len=args.long_len + 64,
        max_num_batched_tokens=args.chunk,
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=1, temperature=0)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        times.append(1000 * (time.perf_counter() - start))
    print(json.dumps({"ms": times, "tokens": sum(map(len, prompts))}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pythons", default=sys.executable, help="comma-separated")
    parser.add_argument("--workloads", default="short,long")
    parser.add_argument("--long-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="HF folder (default: random SmolLM2-shaped)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="short", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    pythons = args.pythons.split(",")
    runs: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, HERE)
            import torch
            from throughput import build_random_model

            model = build_random_model(tmp, torch.bfloat16)
        for _ in range(args.rounds):
            for workload in args.workloads.split(","):
                for python in pythons:
                    cmd = [python, os.path.abspath(__file__), "--worker", "--model", model,
                           "--workload", workload, "--long-len", str(args.long_len),
                           "--chunk", str(args.chunk), "--repeats", str(args.repeats),
                           "--threads", str(args.threads)]  # fmt: skip
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=True)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    key = f"{python} {workload}"
                    runs.setdefault(key, []).append(statistics.median(result["ms"]))
                    tokens[workload] = result["tokens"]
                    loads.append(os.getloadavg()[0])
    summary = {
        key: {"median_ms": round(statistics.median(v), 1), "min": round(min(v), 1),
              "max": round(max(v), 1)}
        for key, v in runs.items()
    }  # fmt: skip
    print(json.dumps({"bench": "prefill_step", "threads": args.threads, "chunk": args.chunk,
                      "tokens": tokens, "rounds": args.rounds, "repeats": args.repeats,
                      "load_average": [min(loads), max(loads)], "runs": summary}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
