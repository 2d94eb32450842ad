#!/usr/bin/env python3
"""Sampler overhead at batch 32 on SmolLM2: structured output (JSON schema) and penalties
against unconstrained greedy decoding, same prompts, same number of tokens.

    hack/bench/sampling.py [--batch-size 32] [--max-tokens 64] [--model PATH.gguf]

Every request runs exactly --max-tokens steps (unconstrained: ignore_eos; structured: a
schema too long to finish in that budget), so all variants decode a full batch throughout.
Grammars are compiled before timing (the server compiles them off the engine thread).
The variants alternate in rounds (the order rotating each round), so a shared machine's
load drifts over all of them alike; each round gives every variant's tokens/s and its
ratio to that round's unconstrained run. Prints one JSON object: per variant the median
tokens/s and ratio with their spread (min, max) over the rounds.
Run it via its path (it does not import ./operator).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench_common import default_model, summary

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.sampling_params import StructuredOutputsParams


def long_schema(i: int) -> dict[str, Any]:
    """A distinct schema per request (its own key), needing more than the token budget."""
    item = {"type": "string", "maxLength": 12}
    words = {"type": "array", "items": item, "minItems": 40}
    return {
        "type": "object",
        "properties": {f"topic{i}": {"type": "string", "maxLength": 20}, "words": words},
        "required": [f"topic{i}", "words"],
        "additionalProperties": False,
    }


def timed(llm: LLM, prompts: list[Any], params: list[SamplingParams]) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for o in outs for c in o.outputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    llm = LLM(args.model or default_model(), max_num_seqs=args.batch_size, max_model_len=512,
              kv_cache_memory=256 * 2**20)  # fmt: skip
    tok = llm.get_tokenizer()
    prompts: list[Any] = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"List {i + 3} words about topic number {i} as JSON."}],
            tokenize=True,
            add_generation_prompt=True,
        )
        for i in range(args.batch_size)
    ]
    prompts = [{"prompt_token_ids": list(getattr(ids, "input_ids", ids))} for ids in prompts]
    n = args.max_tokens
    base = dict(temperature=0.0, max_tokens=n)
    specs = [StructuredOutputsParams(json=long_schema(i)) for i in range(args.batch_size)]
    for spec in specs:
        llm.llm_engine.grammar.compile(spec)
    variants = {
        "unconstrained": [SamplingParams(ignore_eos=True, **base)] * args.batch_size,  # type: ignore[arg-type]
        "json_schema": [SamplingParams(structured_outputs=s, **base) for s in specs],  # type: ignore[arg-type]
        "penalties": [
            SamplingParams(ignore_eos=True, repetition_penalty=1.1, presence_penalty=0.5,
                           frequency_penalty=0.5, **base)  # type: ignore[arg-type]
        ] * args.batch_size,
    }  # fmt: skip
    for params in variants.values():  # warm-up: a full batch of each, untimed
        timed(llm, prompts, params)
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    for r in range(args.rounds):
        this_round: dict[str, float] = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            elapsed, tokens = timed(llm, prompts, variants[name])
            assert tokens == n * args.batch_size, (name, tokens)
            this_round[name] = tokens / elapsed
        for name in names:
            rates[name].append(this_round[name])
        for name in ratios:
            ratios[name].append(this_round[name] / this_round["unconstrained"])
    result: dict[str, Any] = {"batch_size": args.batch_size, "max_tokens": n, "rounds": args.rounds}
    for name in names:
        result[f"{name}_tok_s"] = summary(rates[name], 1)
    for name, values in ratios.items():
        result[f"{name}_ratio"] = summary(values, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
