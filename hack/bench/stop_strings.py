#!/usr/bin/env python3
"""Cost of 1,000 stop strings against none (issue 17: must stay under 2x).

    hack/bench/stop_strings.py [--num-stops 1000] [--max-tokens 300] [--batch-size 4]
                               [--model PATH.gguf]

End to end: the same prompts through `LLM.generate` (SmolLM2 by default), greedy with
ignore_eos, with no stop strings and with --num-stops that never match, so both decode
exactly batch x max-tokens tokens (best of --repeats alternating runs). Detokenizer
alone: the per-token stop check over one output, with the automaton (StopMatcher) and
with the search it replaced (every stop string after every token). Prints one JSON
object. Run it via its path.
"""

from __future__ import annotations

import argparse
import json
import time

from bench_common import default_model

from pinnace.runtime import LLM, SamplingParams
from pinnace.runtime.engine.stop_strings import StopMatcher


def never_matching(num: int) -> list[str]:
    return [f"\u2603{i:05d}\u2603" + "~" * (i % 24) for i in range(num)]


def generate(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, str]:
    start = time.perf_counter()
    outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
    return elapsed, outs[0].outputs[0].text


def naive_find(text: str, old_len: int, stops: list[str]) -> int:
    return min(
        (i for s in stops if (i := text.find(s, max(0, old_len - len(s) + 1))) >= 0),
        default=-1,
    )


def detok_only(text: str, stops: list[str], repeats: int = 5) -> dict[str, float]:
    """Seconds for the stop checks over `text` grown 4 characters at a time."""
    ends = range(4, len(text) + 4, 4)
    matcher = StopMatcher(stops)
    start = time.perf_counter()
    for _ in range(repeats):
        for end in ends:
            matcher.find(text[:end], end - 4)
    automaton = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for end in ends:
        naive_find(text[:end], end - 4, stops)
    return {"automaton_s": automaton, "search_every_stop_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--num-stops", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs; the best counts")
    args = p.parse_args()
    llm = LLM(args.model or default_model(), max_model_len=1024)
    prompts = [f"Write a long story about ship number {i}." for i in range(args.batch_size)]
    base = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    stops = never_matching(args.num_stops)
    generate(llm, prompts, SamplingParams(**{**base, "max_tokens": 8}))  # warm up
    none_s = many_s = float("inf")
    for _ in range(args.repeats):  # alternating, so load from elsewhere hits both alike
        elapsed, text = generate(llm, prompts, SamplingParams(**base))
        none_s = min(none_s, elapsed)
        elapsed, text_with = generate(llm, prompts, SamplingParams(**base, stop=stops))
        many_s = min(many_s, elapsed)
        assert text == text_with  # nothing matched: the same work
    report = {
        "num_stops": args.num_stops,
        "tokens": args.batch_size * args.max_tokens,
        "no_stops_s": round(none_s, 3),
        "with_stops_s": round(many_s, 3),
        "ratio": round(many_s / none_s, 3),
        "detokenizer_only": {k: round(v, 5) for k, v in detok_only(text, stops).items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
