"""kv_cache_dtype="fp8": the same memory budget holds twice the blocks, and greedy decisions
stay those of the bfloat16 cache on the real model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pinnace.runtime import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the moon.",
    "List three fruits.",
    "Explain why the sky is blue.",
    "Tell me a story about a dragon.",
    "How do I learn a new language?",
    "At what temperature does water boil?",
    "What is your favourite book?",
    "Give me a recipe for pancakes.",
    "What are the planets of the solar system?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a bicycle work?",
]


def test_fp8_cache_doubles_the_blocks_of_a_budget(make_tiny_model: Callable[[str], Path]) -> None:
    path = str(make_tiny_model("Qwen2ForCausalLM"))
    budget = dict(dtype="float32", kv_cache_memory=2**20, max_model_len=256)
    auto = LLM(model=path, **budget)
    fp8 = LLM(model=path, kv_cache_dtype="fp8", **budget)
    # float32 -> 1 byte per value: 4x; the same budget in bfloat16 would give 2x.
    assert fp8.llm_engine.parts.num_blocks == 4 * auto.llm_engine.parts.num_blocks
    assert fp8.llm_engine.parts.kv_cache_dtype == torch.float8_e4m3fn
    assert fp8.llm_engine.parts.runner.kv_caches[0].element_size() == 1
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = fp8.generate(["Hello, my name is", "1 2 3"], greedy, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


@pytest.mark.slow
def test_fp8_cache_keeps_greedy_tokens_on_the_real_model(
    reuse_checkpoint: str, smollm2_checkpoint: Any, model_eval: SimpleNamespace
) -> None:
    """Token agreement, teacher-forced: along each greedy continuation (from the bf16 run and
    from the fp8 run), does the model pick the same next token with an fp8 cache as with a
    bf16 cache, given the same prefix? Both caches go through the same prefill path, so only
    the cache dtype differs.

    Free-running sequences diverge for good after the first near-tie flips, so comparing two
    free runs position by position mostly measures where that happened (printed only).
    SmolLM2-135M has many near-ties at bf16 logit resolution (logits reach ~40, where one bf16
    step is 0.25): agreement measured 94.6-97 % per direction, and every flip so far was at a
    bf16-cache top-2 margin of at most 1.1. So the test asserts the cache error's size, not a
    rate of near-ties: no position whose top-2 margin is 1.5 or more may change its pick (a
    wrong fp8 scale or layout flips confident positions too), and overall agreement >= 93 %.
    """
    tok = smollm2_checkpoint.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    engine = dict(dtype="bfloat16", kv_cache_memory=32 * 2**20, max_model_len=1024)
    bf16 = LLM(model=reuse_checkpoint, **engine)
    fp8 = LLM(model=reuse_checkpoint, kv_cache_dtype="fp8", **engine)
    assert fp8.llm_engine.parts.num_blocks == 2 * bf16.llm_engine.parts.num_blocks
    runs = {
        name: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        for name, llm in (("bf16", bf16), ("fp8", fp8))
    }
    model, config = bf16.llm_engine.parts.runner.model, smollm2_checkpoint.config

    def agreement(run: str) -> float:
        """Share of positions of `run`'s continuations where both caches pick the same token."""
        same = total = 0
        for prompt, out in zip(prompts, runs[run], strict=True):
            ids = prompt + out
            logits = [
                model_eval.sequence_logits(model, config, ids, cache)[len(prompt) - 1 : -1].float()
                for cache in (torch.bfloat16, torch.float8_e4m3fn)
            ]
            picks = [lg.argmax(-1) for lg in logits]
            top2 = logits[0].topk(2, dim=-1).values
            margin = top2[:, 0] - top2[:, 1]
            flipped = picks[0] != picks[1]
            confident_flips.extend(float(m) for m in margin[flipped & (margin >= 1.5)])
            same += int((~flipped).sum())
            total += len(out)
        return same / total

    confident_flips: list[float] = []

    on_bf16_run, on_fp8_run = agreement("bf16"), agreement("fp8")
    pairs = zip(runs["bf16"], runs["fp8"], strict=True)
    free = [a == b for x, y in pairs for a, b in zip(x, y, strict=True)]
    print(
        f"\nteacher-forced greedy agreement of fp8 and bf16 caches: on the bf16 run "
        f"{on_bf16_run:.3f}, on the fp8 run {on_fp8_run:.3f}; "
        f"free-running position agreement {sum(free) / len(free):.3f}"
    )
    assert not confident_flips, f"fp8 changed picks at top-2 margins {confident_flips}"
    assert min(on_bf16_run, on_fp8_run) >= 0.93
