#!/usr/bin/env python3
"""Speculative decoding's batch-1 speedup estimated from step counts and step costs, which a
shared machine disturbs less than wall-time ratios.

    hack/bench/spec_step_cost.py [--threads 1] [--ks 0,3,5,7] [--rounds 3] [--max-tokens 96]

The same copy-heavy prompts as hack/bench/speculative.py, one at a time, greedy, through one
engine per ngram k (0: no speculation), the engines alternating in rounds in one process.
Every ModelRunner.execute is timed and keyed by the step's scheduled tokens (1-8, or
"prefill" above). Outputs are deterministic, so each engine's count of steps per size is
exact; the medians of the step times per size, pooled over all engines and rounds, are
each size's cost. Estimated time = sum of counts x median costs (the first round is a
warm-up); prints one JSON object with the medians, per k the steps per size and the
estimated speedup over k 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from typing import Any

import torch
from bench_common import default_model
from speculative import TASKS

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.worker import model_runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ks", default="0,3,5,7")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    if 0 not in ks or args.rounds < 2:
        raise SystemExit("--ks must include 0 (no speculation) and --rounds be at least 2")
    current: list[int | None] = [None]
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    costs: dict[str, list[float]] = collections.defaultdict(list)
    execute = model_runner.ModelRunner.execute

    def timed_execute(self: Any, sched: Any) -> Any:
        start = time.perf_counter()
        out = execute(self, sched)
        elapsed = time.perf_counter() - start
        tokens = sum(s.num_scheduled_tokens for s in sched.scheduled)
        size = str(tokens) if tokens <= 8 else "prefill"
        costs[size].append(elapsed)
        if current[0] is not None:
            counts[current[0]][size] += 1
        return out

    model_runner.ModelRunner.execute = timed_execute  # type: ignore[method-assign]
    common: dict[str, Any] = dict(max_model_len=1024, kv_cache_memory=256 * 2**20)
    engines = {}
    for k in ks:
        spec = None
        if k:
            spec = {"method": "ngram", "num_speculative_tokens": k}
            spec |= {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
        engines[k] = LLM(default_model(), speculative_config=spec, **common)
    tok = engines[0].get_tokenizer()
    prompts = []
    for task in TASKS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": task}], tokenize=True, add_generation_prompt=True
        )
        prompts.append({"prompt_token_ids": list(getattr(ids, "input_ids", ids))})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for r in range(args.rounds):
        for k in ks if r % 2 == 0 else ks[::-1]:
            current[0] = k if r > 0 else None
            for prompt in prompts:
                engines[k].generate([prompt], params, use_tqdm=False)
    timed = args.rounds - 1  # the first round warms up
    median = {size: statistics.median(v) for size, v in costs.items()}
    estimate = {k: sum(n * median[s] for s, n in counts[k].items()) for k in ks}
    result = {
        "bench": "spec_step_cost",
        "threads": args.threads,
        "rounds": args.rounds,
        "median_step_ms": {s: round(1000 * v, 2) for s, v in sorted(median.items())},
        "per_k": {
            k: {
                "steps_per_round": {s: n // timed for s, n in sorted(counts[k].items())},
                "estimated_over_none": round(estimate[0] / estimate[k], 3),
            }
            for k in ks
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
