#!/usr/bin/env python3
"""Speculative decoding on SmolLM2: n-gram prompt lookup and a draft model against no
speculation, on a copy-heavy workload (prompts that ask to repeat or lightly edit a given
code block or text).

    hack/bench/speculative.py [--threads 2] [--max-tokens 128] [--rounds 3] [--model PATH]
        [--methods ngram,draft] [--num-speculative-tokens K[,K...]]
        [--draft-layers 6 | --draft-model PATH]

Several ngram K (e.g. 3,4,5) run as engines ngram_k3, ngram_k4, ... in the same rounds.

The draft model is by default the target's own first --draft-layers layers plus its
embedding, final norm and head, written once as a float safetensors folder (from the
dequantized GGUF) under --draft-dir; its acceptance rate is reported with its speed.

Batch 1: each prompt alone, greedy. In float32 the two engines agree token for token (the
CPU tests check it); in bf16 a k + 1-token verification forward rounds differently from a
one-token decode, so near-ties can flip: the JSON reports how many outputs agree. Batch
32: the same prompts (repeated) at once, the cost of proposing and verifying when the
batch is already compute-bound. The engines alternate in rounds (order swapped each
round), so a shared machine's load drifts over both alike; each round gives each engine's
output tokens/s and each method's ratio over none. Prints one JSON object with the median
and spread (min, max) over the rounds, and each method's acceptance rate; also the ratio
of output tokens per CPU second of this process, steadier than wall time when shared.
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
from safetensors.torch import save_file

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.models.loader import open_checkpoint

# 5: verification steps of 6 tokens (the native one-call Llama decode takes up to 8, its
# GEMV's MAX_ROWS; AMX tiles make 2-8 rows cost about what 1 row does). Batch 1, 1 thread,
# load 3.3-3.8, hack/bench/spec_step_cost.py --ks 0,3,5,7 --rounds 3: median step ms by
# tokens 1: 26.6, 4: 26.5, 6: 30.7, 8: 37.5; estimated over none k 3 1.77x, k 5 1.84x,
# k 7 1.84x. k 5 ties k 7 with smaller steps, whose per-token parts (attention, LM head
# rows, sampling) weigh more at 2 threads than at 1.
DEFAULT_NGRAM_K = "5"

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
    """(seconds, CPU seconds of this process, output tokens, token lists): all prompts at
    once, or one at a time. On a machine shared with other work, CPU time counts only
    this process's compute, so its ratio drifts less with the others' load than wall
    time's (it still sees their cache and memory-bandwidth contention)."""
    start, cpu = time.perf_counter(), time.process_time()
    if batched:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = [o.outputs[0].token_ids for o in outs]
    return elapsed, cpu, sum(len(t) for t in tokens), tokens


def rounds(
    engines: dict[str, LLM], prompts: list[Any], params: SamplingParams, n: int, batched: bool
) -> dict[str, Any]:
    names = list(engines)
    for llm in engines.values():  # warm-up, untimed
        timed(llm, prompts[:2], params, batched)
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names if name != "none"}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in ratios}
    agree: dict[str, int] = {}
    for r in range(n):
        this: dict[str, float] = {}
        per_cpu: dict[str, float] = {}
        tokens: dict[str, list] = {}
        for name in names if r % 2 == 0 else names[::-1]:
            elapsed, cpu, count, tokens[name] = timed(engines[name], prompts, params, batched)
            this[name] = count / elapsed
            per_cpu[name] = count / cpu
            rates[name].append(this[name])
        for name in ratios:
            ratios[name].append(this[name] / this["none"])
            cpu_ratios[name].append(per_cpu[name] / per_cpu["none"])
            agree[name] = sum(a == b for a, b in zip(tokens[name], tokens["none"], strict=True))
    out: dict[str, Any] = {f"{k}_tok_s": summary(v, 1) for k, v in rates.items()}
    for name, values in ratios.items():
        out[f"{name}_over_none"] = summary(values, 3)
        # Output tokens per CPU second of this process, over none's.
        out[f"{name}_over_none_cpu_time"] = summary(cpu_ratios[name], 3)
        out[f"{name}_outputs_equal"] = f"{agree[name]}/{len(prompts)} (last round)"
    return out


def truncated_draft(model: str, num_layers: int, root: str) -> str:
    """The target's first `num_layers` layers plus embedding, norm and head as a float
    safetensors folder (written once per model and depth under `root`)."""
    out = os.path.join(root, f"{os.path.basename(model)}-first-{num_layers}-layers")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    ckpt = open_checkpoint(model)
    keep = {f"model.layers.{i}." for i in range(num_layers)}
    tensors = {
        name: tensor.to(torch.bfloat16).contiguous()
        for name, tensor in ckpt.weights(torch.float32)
        if not name.startswith("model.layers.") or any(name.startswith(k) for k in keep)
    }
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = ckpt.config
    config.num_hidden_layers = num_layers
    config.save_pretrained(out)
    ckpt.tokenizer.save_pretrained(out)
    return out


def acceptance(llm: LLM) -> dict[str, float]:
    stats = llm.llm_engine.stats().spec_decoding
    return {
        "acceptance_rate": round(stats.acceptance_rate, 3),
        "mean_accepted_per_draft": round(stats.num_accepted_tokens / max(stats.num_drafts, 1), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", default="ngram,draft", help="comma-separated: ngram, draft")
    p.add_argument(
        "--num-speculative-tokens",
        default=DEFAULT_NGRAM_K,
        help="ngram proposals per step; comma-separated to compare several",
    )
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--draft-model", default=None, help="a draft folder (default: truncated)")
    p.add_argument("--draft-layers", type=int, default=6, help="layers of the truncated draft")
    p.add_argument("--draft-tokens", type=int, default=3, help="draft num_speculative_tokens")
    p.add_argument("--draft-dir", default="/tmp/pinnace-bench-drafts")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=len(TASKS), help="for a quick check")
    p.add_argument("--skip-batch-1", action="store_true", help="only the batch-N cost")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {"ngram", "draft"}:
        raise SystemExit(f"--methods takes ngram and/or draft, got {args.methods!r}")
    configs: dict[str, dict[str, Any]] = {}
    if "ngram" in methods:
        ks = [int(k) for k in str(args.num_speculative_tokens).split(",")]
        for k in ks:
            configs["ngram" if len(ks) == 1 else f"ngram_k{k}"] = {
                "method": "ngram",
                "num_speculative_tokens": k,
                "prompt_lookup_min": args.prompt_lookup_min,
                "prompt_lookup_max": args.prompt_lookup_max,
            }
    if "draft" in methods:
        draft = args.draft_model or truncated_draft(model, args.draft_layers, args.draft_dir)
        configs["draft"] = {"model": draft, "num_speculative_tokens": args.draft_tokens}
    common = dict(
        max_model_len=1024,
        kv_cache_memory=512 * 2**20,
        max_num_seqs=args.batch_size,
        dtype=args.dtype,
    )
    engines = {"none": LLM(model, **common)}  # type: ignore[arg-type]
    for name, spec in configs.items():
        engines[name] = LLM(model, speculative_config=spec, **common)  # type: ignore[arg-type]
    tok = engines["none"].get_tokenizer()
    prompts: list[Any] = []
    for task in TASKS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": task}], tokenize=True, add_generation_prompt=True
        )
        prompts.append({"prompt_token_ids": list(getattr(ids, "input_ids", ids))})
    prompts = prompts[: args.num_prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    result: dict[str, Any] = {
        "model": os.path.basename(model),
        "threads": args.threads,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "speculative_configs": configs,
        # Measured, not described: the 1-minute load average before and after the run.
        "load_average_1m": {"start": round(os.getloadavg()[0], 2)},
    }
    if not args.skip_batch_1:
        result["batch_1"] = rounds(engines, prompts, params, args.rounds, batched=False)
        for name in configs:
            result["batch_1"][f"{name}_acceptance"] = acceptance(engines[name])
    batch = [prompts[i % len(prompts)] for i in range(args.batch_size)]
    short = SamplingParams(temperature=0.0, max_tokens=args.max_tokens // 2, ignore_eos=True)
    result[f"batch_{args.batch_size}"] = rounds(engines, batch, short, args.rounds, batched=True)
    result["load_average_1m"]["end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
