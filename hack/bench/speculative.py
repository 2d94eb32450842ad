#!/usr/bin/env python3
"""Speculative decoding on SmolLM2: n-gram prompt lookup against no speculation, on a
copy-heavy workload (prompts that ask to repeat or lightly edit a given code block or text).

    hack/bench/speculative.py [--threads 2] [--max-tokens 128] [--rounds 3] [--model PATH]

Batch 1: each prompt alone, greedy. In float32 the two engines agree token for token (the
CPU tests check it); in bf16 a k + 1-token verification forward rounds differently from a
one-token decode, so near-ties can flip: the JSON reports how many outputs agree. Batch
32: the same prompts (repeated) at once, the cost of proposing and verifying when the
batch is already compute-bound. The engines alternate in rounds (order swapped each
round), so a shared machine's load drifts over both alike; each round gives each engine's
output tokens/s and the ngram/none ratio. Prints one JSON object with the median and
spread (min, max) over the rounds, and the n-gram acceptance rate.
Run it via its path (it does not import ./operator).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from bench_common import default_model, summary

from pinnace.runtime import LLM, SamplingParams

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor "
    "jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow."
)
TASKS = [
    f"Repeat this code exactly, without any change:\n```python\n{CODE}```",
    f"Rename the function merge_sorted to merge in this code, change nothing else:\n"
    f"```python\n{CODE}```",
    f"Copy this text word for word:\n{TEXT}",
    f"Add a comment line at the top of this code and repeat it:\n```python\n{CODE}```",
]


def timed(llm: LLM, prompts: list[Any], params: SamplingParams, batched: bool) -> tuple:
    """(seconds, output tokens, token lists): all prompts at once, or one at a time."""
    start = time.perf_counter()
    if batched:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return elapsed, sum(len(t) for t in tokens), tokens


def rounds(
    engines: dict[str, LLM], prompts: list[Any], params: SamplingParams, n: int, batched: bool
) -> dict[str, Any]:
    names = list(engines)
    for llm in engines.values():  # warm-up, untimed
        timed(llm, prompts[:2], params, batched)
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios = []
    for r in range(n):
        this: dict[str, float] = {}
        tokens: dict[str, list] = {}
        for name in names if r % 2 == 0 else names[::-1]:
            elapsed, count, tokens[name] = timed(engines[name], prompts, params, batched)
            this[name] = count / elapsed
            rates[name].append(this[name])
        agree = sum(a == b for a, b in zip(tokens["ngram"], tokens["none"], strict=True))
        ratios.append(this["ngram"] / this["none"])
    out: dict[str, Any] = {f"{k}_tok_s": summary(v, 1) for k, v in rates.items()}
    out["ngram_over_none"] = summary(ratios, 3)
    out["outputs_equal"] = f"{agree}/{len(prompts)} (last round)"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--skip-batch-1", action="store_true", help="only the batch-N cost")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_min": args.prompt_lookup_min,
        "prompt_lookup_max": args.prompt_lookup_max,
    }
    common = dict(
        max_model_len=1024,
        kv_cache_memory=512 * 2**20,
        max_num_seqs=args.batch_size,
        dtype=args.dtype,
    )
    engines = {
        "none": LLM(model, **common),  # type: ignore[arg-type]
        "ngram": LLM(model, speculative_config=spec, **common),  # type: ignore[arg-type]
    }
    tok = engines["none"].get_tokenizer()
    prompts: list[Any] = []
    for task in TASKS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": task}], tokenize=True, add_generation_prompt=True
        )
        prompts.append({"prompt_token_ids": list(getattr(ids, "input_ids", ids))})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    result: dict[str, Any] = {
        "model": os.path.basename(model),
        "threads": args.threads,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "speculative_config": spec,
        "machine": "shared 2-core VM, 4-5 agents running tests at the same time",
    }
    if not args.skip_batch_1:
        result["batch_1"] = rounds(engines, prompts, params, args.rounds, batched=False)
        stats = engines["ngram"].llm_engine.stats().spec_decoding
        result["batch_1"]["acceptance_rate"] = round(stats.acceptance_rate, 3)
        result["batch_1"]["mean_accepted_per_draft"] = round(
            stats.num_accepted_tokens / max(stats.num_drafts, 1), 2
        )
    batch = [prompts[i % len(prompts)] for i in range(args.batch_size)]
    short = SamplingParams(temperature=0.0, max_tokens=args.max_tokens // 2, ignore_eos=True)
    result[f"batch_{args.batch_size}"] = rounds(engines, batch, short, args.rounds, batched=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
